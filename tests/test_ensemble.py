"""Deep ensembles (rail.deepz.ensemble) and error-aware augmentation (rail.deepz.augment)
for the catalog methods: tiny synthetic data, 2-member ensembles, seconds per test."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from rail.core.data import TableHandle
from scipy.special import ndtr

from rail.deepz.augment import EpochResampler, depth_from_errors, resample_photometry, validation_at_depth
from rail.deepz.ensemble import ModelMembersError, member_rows, member_state_dicts, pool_mixtures
from rail.deepz.photometry import MAG_ERR_FACTOR, Photometry
from rail.deepz.pdf import MASS_TOL, pdf_ok
from rail.estimation.algos.deepz_embed import DeepzEmbedEstimator, DeepzEmbedInformer
from rail.estimation.algos.deepz_lstm import DeepzLSTMEstimator, DeepzLSTMInformer
from rail.estimation.algos.deepz_nnc import DeepzNNCEstimator, DeepzNNCInformer

BANDS = [f"mag_{b}" for b in "ugriz"]
ERRS = [b + "_err" for b in BANDS]
_ids = itertools.count()


def _name(prefix):
    return f"{prefix}_ens_{next(_ids)}"


@pytest.fixture(scope="module")
def table():
    rng = np.random.default_rng(3)
    n = 400
    z = rng.uniform(0.1, 2.5, n)
    data = {"redshift": z}
    for i, b in enumerate(BANDS):
        data[b] = 22 + np.sin(z * (i + 1)) + rng.normal(0, 0.05, n)
        data[b + "_err"] = np.full(n, 0.05)
    data["mag_u"][:15] = 99.0  # non-detections
    return data


COMMON = dict(bands=BANDS, err_bands=ERRS, mag_limits={b: 27.0 for b in BANDS}, zmin=0.0, zmax=3.0,
              progress=False, num_threads=1, hdf5_groupname="")
METHODS = {
    "nnc": (DeepzNNCInformer, DeepzNNCEstimator, dict(epochs=2, hidden_layers=[16], nbins=60)),
    "lstm": (DeepzLSTMInformer, DeepzLSTMEstimator, dict(epochs=2, lstm_units=[8], dense_units=[8],
                                                         n_components=3, batch_size=128)),
    "embed": (DeepzEmbedInformer, DeepzEmbedEstimator, dict(epochs=2, ae_epochs=2, hidden_layers=[16], ae_hidden=[8],
                                                            som_shape=[3, 3], som_iterations=200, som_n_boot=5)),
}


def _inform(method, data, **kw):
    inf_cls, _, opts = METHODS[method]
    inf = inf_cls.make_stage(name=_name("inf"), model=_name("model") + ".pkl", **{**COMMON, **opts, **kw})
    inf.inform(TableHandle("input", data=data))
    return inf.model


def _estimate(method, model, data):
    _, est_cls, _ = METHODS[method]
    est = est_cls.make_stage(name=_name("est"), model=model, output=_name("out") + ".hdf5", hdf5_groupname="",
                             num_threads=1)
    return est.estimate(TableHandle("input", data=data)).data


@pytest.fixture(scope="module")
def ensembles(table, tmp_path_factory):
    """Per method: a single model, a 2-member ensemble and the same ensemble trained again."""
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("ens"))
    try:
        out = {}
        for method in METHODS:
            out[method] = (_inform(method, table, n_members=1), _inform(method, table, n_members=2),
                           _inform(method, table, n_members=2))
        yield out
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("method", list(METHODS))
def test_ensemble_layout_output_and_determinism(method, ensembles, table, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    single, ens, again = ensembles[method]
    # n_members=1: the single model's layout and format version, unchanged
    assert "state_dict" in single and "member_state_dicts" not in single and single["format_version"] == 2
    assert ens["n_members"] == 2 and len(ens["member_state_dicts"]) == 2 and ens["format_version"] == 3
    assert "state_dict" not in ens
    # member 0 is the single model's network (seed + 0, same rows); member 1 differs (seed + 1)
    sd0, sd1 = ens["member_state_dicts"]
    assert all(torch.equal(sd0[k], single["state_dict"][k]) for k in sd0)
    assert any(not torch.equal(sd0[k], sd1[k]) for k in sd0 if sd0[k].is_floating_point())
    # the same seed gives the same members
    for a, b in zip(ens["member_state_dicts"], again["member_state_dicts"]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    out = _estimate(method, ens, table)
    n = len(table["redshift"])
    assert out.npdf == n
    assert pdf_ok(out, MASS_TOL, (0.0, 3.0)).all()
    for key in ("zmode", "zmean"):
        assert np.isfinite(out.ancil[key]).all() and out.ancil[key].shape[0] == n
    if method != "nnc":  # a pooled mixture of 2 x K components (LSTM) / the shared K grid (embed)
        k = 2 * 3 if method == "lstm" else ens["arch"]["n_components"]
        assert out.objdata["weights"].shape == (n, k)
        np.testing.assert_allclose(out.objdata["weights"].sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(out.ancil["zmode"], _estimate(method, again, table).ancil["zmode"])
    diag = ens["ensemble_diagnostics"]
    assert 0 <= diag["val_pit_ks_pooled"] <= 1


@pytest.mark.parametrize("method", list(METHODS))
def test_member_count_mismatch_is_refused(method, ensembles, table, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    single, ens, _ = ensembles[method]
    with pytest.raises(ModelMembersError, match="n_members=3"):
        _estimate(method, dict(ens, n_members=3), table)
    with pytest.raises(ModelMembersError, match="both"):
        _estimate(method, dict(ens, state_dict=single["state_dict"]), table)
    with pytest.raises(ModelMembersError, match="format version"):
        _estimate(method, dict(ens, format_version=2), table)
    with pytest.raises(ModelMembersError, match="holds one"):
        _estimate(method, dict(single, n_members=2), table)


def test_member_rows_and_pool():
    tr = np.arange(10, 60)
    assert member_rows(tr, 1, 0, False) is tr
    a, b = member_rows(tr, 1, 0, True), member_rows(tr, 1, 1, True)
    assert len(a) == len(tr) and np.isin(a, tr).all() and len(np.unique(a)) < len(tr)
    np.testing.assert_array_equal(a, member_rows(tr, 1, 0, True))
    assert not np.array_equal(a, b)
    rng = np.random.default_rng(0)
    w = [rng.dirichlet(np.ones(3), 4).astype(np.float32) for _ in range(2)]
    w_, mu, s = pool_mixtures([(w[0], np.zeros((4, 3)), np.ones((4, 3))), (w[1], np.ones((4, 3)), np.ones((4, 3)))])
    assert w_.shape == (4, 6) and mu.shape == (4, 6)
    np.testing.assert_allclose(w_.sum(1), 1.0, rtol=1e-6)
    with pytest.raises(ModelMembersError, match="neither"):
        member_state_dicts({"format_version": 3}, "x")


def test_nnc_bootstrap_members_differ_from_the_single(table, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    single = _inform("nnc", table, n_members=1, temperature_scaling=False)
    boot = _inform("nnc", table, n_members=2, bootstrap=True, temperature_scaling=False)
    sd = boot["member_state_dicts"][0]
    assert any(not torch.equal(sd[k], single["state_dict"][k]) for k in sd if sd[k].is_floating_point())


# ----------------------------------------------------------------- augmentation


def _phot(n=20000, seed=0):
    rng = np.random.default_rng(seed)
    mags = np.column_stack([rng.uniform(20, 23, n), rng.uniform(20, 23, n), np.full(n, 26.5)]).astype(np.float32)
    errs = np.column_stack([np.full(n, 0.05), np.full(n, 0.1), np.full(n, 0.8)]).astype(np.float32)
    valid = np.ones((n, 3), dtype=bool)
    valid[:500, 0] = False  # non-detections: magnitude = the limit, error nondetect_err
    mags[:500, 0], errs[:500, 0] = 27.0, 1.0
    return Photometry(bands=["a", "b", "c"], mags=mags, errs=errs, valid=valid)


SETTINGS = dict(mag_limits={"a": 27.0, "b": 27.0, "c": 27.0}, nondetect_err=1.0, missing_policy="limit",
                max_mag_err=5.0, valid_mag_range=[0.0, 50.0])


def _z_scores(phot, new, sigma):
    f, f_new = 10 ** (-0.4 * phot.mags.astype(np.float64)), 10 ** (-0.4 * new.mags.astype(np.float64))
    return (f_new - f) / sigma


def test_resampled_fluxes_follow_the_errors_and_nondetections_stay():
    phot = _phot()
    before = (phot.mags.copy(), phot.errs.copy(), phot.valid.copy())
    new = resample_photometry(phot, np.random.default_rng(1), SETTINGS)
    for a, b in zip(before, (phot.mags, phot.errs, phot.valid)):  # the input is not modified
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(new.mags[:500, 0], phot.mags[:500, 0])  # non-detections untouched
    np.testing.assert_array_equal(new.errs[:500, 0], phot.errs[:500, 0])
    assert not new.valid[:500, 0].any()
    f = 10 ** (-0.4 * phot.mags.astype(np.float64))
    sigma = f * phot.errs / MAG_ERR_FACTOR
    for band in (0, 1):  # bright bands: no draw is lost, the flux offsets are N(0, sigma)
        rows = phot.valid[:, band]
        assert new.valid[rows, band].all()
        zs = _z_scores(phot, new, sigma)[rows, band]
        n = len(zs)
        # 6 standard errors of the mean / standard deviation of n normal draws
        assert abs(zs.mean()) < 6 / np.sqrt(n)
        assert abs(zs.std() - 1) < 6 / np.sqrt(2 * n)
        # the flux error is kept: new magnitude error = 1.0857 sigma_f / f'
        f_new = 10 ** (-0.4 * new.mags[rows, band].astype(np.float64))
        np.testing.assert_allclose(new.errs[rows, band], MAG_ERR_FACTOR * sigma[rows, band] / f_new, rtol=1e-5)
    # faint band (S/N 1.4 at 26.5 with limit 27): draws fainter than the limit become non-detections
    # at the limit with nondetect_err; P(f' < f_lim) for f' ~ N(f, sigma)
    lost = ~new.valid[:, 2]
    f_lim = 10 ** (-0.4 * 27.0)
    p = float(ndtr((f_lim - f[0, 2]) / sigma[0, 2]))
    n = len(lost)
    assert abs(lost.mean() - p) < 6 * np.sqrt(p * (1 - p) / n)
    assert (new.mags[lost, 2] == 27.0).all() and (new.errs[lost, 2] == 1.0).all()
    assert (new.mags[~lost, 2] <= 27.0).all()


def test_depth_degradation_raises_the_flux_error_to_the_test_depth():
    phot = _phot()
    rng = np.random.default_rng(4)
    phot.mags[:, 1] = rng.uniform(18, 19, len(phot))  # S/N >= 12 at the test depth: no draw is lost
    phot.errs[:, 1] = 0.01
    depth = {"b": 20.0}  # 5-sigma depth: flux error f(20)/5, above band b's own (0.01 mag at 18-19)
    new = resample_photometry(phot, np.random.default_rng(2), SETTINGS, errors=False, depth=depth)
    np.testing.assert_array_equal(new.mags[:, [0, 2]], phot.mags[:, [0, 2]])  # other bands unchanged
    f = 10 ** (-0.4 * phot.mags[:, 1].astype(np.float64))
    sigma = f * phot.errs[:, 1] / MAG_ERR_FACTOR
    sig_t = 10 ** (-0.4 * 20.0) / 5
    assert (sigma < sig_t).all()
    ok = new.valid[:, 1]
    assert ok.all()
    f_new = 10 ** (-0.4 * new.mags[ok, 1].astype(np.float64))
    zs = (f_new - f[ok]) / np.sqrt(sig_t ** 2 - sigma[ok] ** 2)
    assert abs(zs.mean()) < 6 / np.sqrt(ok.sum()) and abs(zs.std() - 1) < 6 / np.sqrt(2 * ok.sum())
    np.testing.assert_allclose(new.errs[ok, 1], MAG_ERR_FACTOR * sig_t / f_new, rtol=1e-5)


def test_depth_from_errors_recovers_a_sky_limited_depth():
    # sky-limited catalogue: one flux error per band, sigma_f = f(m5) / 5, errors from the measured flux
    rng = np.random.default_rng(7)
    n, m5 = 5000, np.array([22.0, 21.0, 23.5])
    true = rng.uniform(18, 24, (n, 3))
    sig = 10 ** (-0.4 * m5) / 5
    f = 10 ** (-0.4 * true) + rng.standard_normal((n, 3)) * sig
    valid = f > 0
    mags = np.where(valid, -2.5 * np.log10(np.where(valid, f, 1.0)), 99.0)
    errs = np.where(valid, MAG_ERR_FACTOR * sig / np.where(valid, f, 1.0), 1.0)
    mags[:100, 1], errs[:100, 1], valid[:100, 1] = 15.0, 1e-4, False  # non-detections (absurd values) are ignored
    phot = Photometry(bands=["a", "b", "c"], mags=mags.astype(np.float32), errs=errs.astype(np.float32), valid=valid)
    got = depth_from_errors(phot)
    np.testing.assert_allclose([got[b] for b in "abc"], m5, atol=1e-4)  # float32 magnitudes and errors
    # the round trip the depth benchmark makes: degrade to a shallower depth, read the depth back
    shallow = resample_photometry(phot, np.random.default_rng(8), SETTINGS, errors=False,
                                  depth={"a": 21.0, "b": 20.0, "c": 22.5})
    back = depth_from_errors(shallow)
    np.testing.assert_allclose([back[b] for b in "abc"], [21.0, 20.0, 22.5], atol=1e-4)
    # S/N window: only the measurements inside it count; too few raises naming the band
    assert abs(depth_from_errors(phot, snr_range=(3, 10))["a"] - 22.0) < 1e-4
    with pytest.raises(ValueError, match="Band 'a'.*min_count"):
        depth_from_errors(phot, snr_range=(1e5, 1e6))
    with pytest.raises(ValueError, match="snr_range"):
        depth_from_errors(phot, snr_range=(5, 1))


def test_epoch_resampler_is_seeded_and_new_each_epoch():
    phot = _phot(200)
    make = lambda p: [p.mags.copy()]  # noqa: E731
    r1, r2 = EpochResampler(phot, SETTINGS, make, seed=5), EpochResampler(phot, SETTINGS, make, seed=5)
    e0, e1 = r1(0)[0], r1(1)[0]
    assert not np.array_equal(e0, e1)
    np.testing.assert_array_equal(e0, r2(0)[0])
    np.testing.assert_array_equal(e1, r2(1)[0])


@pytest.mark.parametrize("method", list(METHODS))
def test_augmented_training_runs_and_is_deterministic(method, ensembles, table, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = _inform(method, table, augment_errors=True, augment_depth={"mag_z": 24.0})
    b = _inform(method, table, augment_errors=True, augment_depth={"mag_z": 24.0})
    plain = ensembles[method][0]  # the same options without augmentation
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    sd = a["state_dict"]
    assert any(not torch.equal(sd[k], plain["state_dict"][k]) for k in sd if sd[k].is_floating_point())
    assert pdf_ok(_estimate(method, a, table), MASS_TOL, (0.0, 3.0)).all()


def test_validation_at_depth_is_one_seeded_depth_draw_of_its_own():
    """The validation copy: only the depth noise (errors=False), only in the bands of
    augment_depth, the same for a seed, new for another, and not the first epoch's training draw
    (same seed, same rows); None without augment_depth (augment_errors alone)."""
    phot = _phot(2000)
    before = (phot.mags.copy(), phot.errs.copy(), phot.valid.copy())
    rows = np.arange(100, 2000, 2)
    make = lambda p: [p.mags.copy(), p.errs.copy()]  # noqa: E731
    depth = {"b": 20.0}  # flux error f(20)/5: above band b's own (0.1 mag at 20-23)
    cfg = {"augment_errors": True, "augment_depth": depth, "seed": 5}
    assert validation_at_depth(dict(cfg, augment_depth={}), SETTINGS, phot, rows, make) is None
    m, e = validation_at_depth(cfg, SETTINGS, phot, rows, make)
    for a, b in zip(before, (phot.mags, phot.errs, phot.valid)):  # the input is not modified
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(m[:, [0, 2]], phot.mags[rows][:, [0, 2]])  # other bands: no redraw
    np.testing.assert_array_equal(e[:, [0, 2]], phot.errs[rows][:, [0, 2]])
    ok = phot.valid[rows, 1] & (m[:, 1] < 27.0) & (e[:, 1] < SETTINGS["max_mag_err"])  # not capped
    assert ok.mean() > 0.5  # band b at 20-23 against a 20.0 depth: the faint half of the draws is lost or capped
    f_new = 10 ** (-0.4 * m[ok, 1].astype(np.float64))
    np.testing.assert_allclose(e[ok, 1], MAG_ERR_FACTOR * (10 ** (-0.4 * 20.0) / 5) / f_new, rtol=1e-5)
    again = validation_at_depth(cfg, SETTINGS, phot, rows, make)[0]
    np.testing.assert_array_equal(m, again)
    assert not np.array_equal(m[:, 1], validation_at_depth(dict(cfg, seed=6), SETTINGS, phot, rows, make)[0][:, 1])
    first_epoch = EpochResampler(phot.take(rows), SETTINGS, make, seed=5, errors=False, depth=depth)(0)[0]
    assert not np.array_equal(m[:, 1], first_epoch[:, 1])
    with pytest.raises(ValueError, match=r"augment_depth.*\['d'\]"):
        validation_at_depth(dict(cfg, augment_depth={"d": 20.0}), SETTINGS, phot, rows, make)


@pytest.mark.parametrize("method", list(METHODS))
def test_augment_depth_degrades_the_validation_split_once(method, table, tmp_path, monkeypatch, capture_validation):
    """Early stopping and calibration see the validation split at the test depth with augment_depth
    (the same copy for every member, repeated for the seed), the measured one otherwise; the
    model trained that way round-trips through its file (weights_only) to the same PDFs."""
    monkeypatch.chdir(tmp_path)
    depth = {"mag_z": 22.0}  # flux error f(22)/5: above the table's (0.05 mag at 21-23)

    def val_inputs(**kw):
        calls = capture_validation()
        model = _inform(method, table, n_members=2, **kw)
        assert len(calls) == (3 if method == "embed" else 2)  # embed: its autoencoder trains first
        return calls[-2:], model

    plain, _ = val_inputs()
    errors_only, _ = val_inputs(augment_errors=True)
    deg, model = val_inputs(augment_depth=depth)
    deg_again, _ = val_inputs(augment_depth=depth)
    for calls in (plain, errors_only, deg, deg_again):  # one validation copy for both members
        np.testing.assert_array_equal(calls[0][0], calls[1][0])
    np.testing.assert_array_equal(errors_only[0][0], plain[0][0])  # augment_errors: measured validation
    assert not np.array_equal(deg[0][0], plain[0][0])
    np.testing.assert_array_equal(deg[0][0], deg_again[0][0])
    changed = np.any(deg[0][0] != plain[0][0], axis=tuple(range(1, deg[0][0].ndim)))
    assert changed.mean() > 0.9  # every validation row has a measured mag_z at S/N > 5 at 22
    from rail.deepz.modelfile import save_model

    save_model(model, str(tmp_path / "depth_model.pkl"))  # what the informer writes; read with weights_only
    a, b = _estimate(method, model, table), _estimate(method, str(tmp_path / "depth_model.pkl"), table)
    np.testing.assert_array_equal(a.pdf(np.linspace(0, 3, 31)), b.pdf(np.linspace(0, 3, 31)))
    assert pdf_ok(b, MASS_TOL, (0.0, 3.0)).all()


def test_augment_options_are_checked(table, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="augment_depth.*mag_y"):
        _inform("nnc", table, augment_depth={"mag_y": 24.0})
    with pytest.raises(ValueError, match="augment_depth"):
        DeepzNNCInformer.make_stage(name=_name("inf"), augment_depth={"mag_z": "deep"})
    with pytest.raises(ValueError, match="n_members"):
        DeepzNNCInformer.make_stage(name=_name("inf"), n_members=0)


# ----------------------------------------------------------------- embedding MDN: calibration on the fixed grid


def _grid_basis():
    from rail.deepz.mixtures import fixed_grid_centers

    centers = fixed_grid_centers(0.0, 3.0, 200)
    return centers, (centers[1] - centers[0]) / 2.0  # the default derived width (basis_spacing 2)


def test_embed_width_factor_never_narrows_the_basis_into_a_comb():
    """DC2's embed_x3_widthcal: the PIT-KS width factor was 0.44, i.e. Gaussians ~4.5 widths
    apart, and the CDE loss turned positive (+5.9). Here the PITs are over-dispersed in the way
    that makes an unbounded fit narrow the components (the truth uniform within the cell of a
    one-component PDF): the factor must still keep the spacing <= basis_spacing widths."""
    from rail.deepz.calibration import fit_sigma_scale
    from rail.estimation.algos.deepz_embed import fit_basis_width_factor

    centers, sigma = _grid_basis()
    d = centers[1] - centers[0]
    rng = np.random.default_rng(0)
    n = 3000
    k = rng.integers(20, 180, n)
    w = np.zeros((n, centers.size))
    w[np.arange(n), k] = 1.0
    z = centers[k] + rng.uniform(-d / 2, d / 2, n)
    grid = np.broadcast_to(centers, w.shape)
    unbounded = fit_sigma_scale(w, grid, np.full(w.shape, sigma), z)
    assert unbounded < 0.9  # the premise: what the former code stored
    f = fit_basis_width_factor(w, centers, sigma, z, basis_spacing=2.0)
    assert f >= 1.0 - 1e-12 and d <= 2.0 * sigma * f * (1 + 1e-9)
    g = fit_basis_width_factor(w, centers, sigma, z, basis_spacing=4.0)  # a looser rule allows 0.5
    assert 0.5 - 1e-12 <= g < 1.0 and d <= 4.0 * sigma * g * (1 + 1e-9)


def test_embed_weight_temperature_sharpens_an_overdispersed_pool():
    from rail.deepz.calibration import ks_uniform
    from rail.deepz.pdf import fixed_grid_pit
    from rail.estimation.algos.deepz_embed import fit_weight_temperature

    centers, sigma = _grid_basis()
    rng = np.random.default_rng(1)
    n = 4000
    mu = rng.uniform(0.6, 2.4, n)
    z = mu + rng.normal(0, 0.05, n)  # truth ~ N(mu, 0.05); the members say N(mu +- 0.01, 0.1)
    members = []
    for shift in (-0.01, 0.01):
        w = np.exp(-0.5 * ((centers[None, :] - mu[:, None] - shift) / 0.1) ** 2)
        members.append((w / w.sum(1, keepdims=True)).astype(np.float32))
    ks_raw = ks_uniform(fixed_grid_pit(np.mean(members, axis=0), centers, sigma, z))
    t, pooled = fit_weight_temperature(members, centers, z)
    # w^(1/T) of a Gaussian envelope is one sqrt(T) times as wide: T near (0.05 / 0.1)^2
    assert 0.15 < t < 0.4
    np.testing.assert_allclose(pooled.sum(1), 1.0, rtol=1e-5)
    ks_cal = ks_uniform(fixed_grid_pit(pooled, centers, sigma, z))
    assert ks_raw > 0.1 and ks_cal < ks_raw / 3


def test_embed_calibrated_models_estimate_what_they_fitted(table, tmp_path, monkeypatch):
    """width_calibration on real (tiny) training: the width factor respects the spacing rule,
    and the estimator applies a stored temperature as w^(1/T), renormalised."""
    monkeypatch.chdir(tmp_path)
    wid = _inform("embed", table, n_members=2, width_calibration="pit_ks")
    arch = wid["arch"]
    spacing = 3.0 / (arch["n_components"] - 1)
    assert spacing <= 2.0 * arch["sigma"] * wid.get("sigma_scale", 1.0) * (1 + 1e-9)
    tem = _inform("embed", table, n_members=2, width_calibration="temperature")
    assert "sigma_scale" not in tem and tem.get("temperature", 1.0) > 0
    assert "val_pit_ks_pooled" in tem["ensemble_diagnostics"]
    single = _inform("embed", table, n_members=1)
    plain = _estimate("embed", single, table)
    tempered = _estimate("embed", dict(single, temperature=0.5), table)
    w0, w1 = (np.asarray(e.objdata["weights"], dtype=np.float64) for e in (plain, tempered))
    expect = w0 ** 2 / (w0 ** 2).sum(1, keepdims=True)
    np.testing.assert_allclose(w1, expect, atol=2e-6)
