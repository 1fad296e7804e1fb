"""Tests of image handling (rail.deepz.images) and the image CNN + GMM ensemble stages."""


from pathlib import Path

import numpy as np
import pytest
import tables_io
import torch
from rail.core.data import TableHandle

from rail.deepz.datasets import PICZL_FEATURES, PICZL_IMAGE_PLANES, load_dc2, load_legacy_dr10, read_piczl_inputs
from rail.deepz.images import (
    BadImageError,
    add_synthetic_stamps,
    exponential_stamps,
    fit_image_scale,
    mag_to_njy,
    preprocess_images,
    synthetic_stamps,
    validate_images,
)
from rail.deepz.modelfile import load_model
from rail.deepz.mixtures import gmm_crps_numpy
from rail.deepz.pdf import MASS_TOL, pdf_ok
from rail.deepz.photometry import BadPhotometryError, mag_err_to_flux_err, mag_to_flux
from rail.deepz.pointmetrics import eta
from rail.deepz.scaling import Standardizer
from rail.deepz.stages import ModelFormatError
from rail.estimation.algos.deepz_cnn import (
    DeepzCNNEstimator,
    DeepzCNNInformer,
    crps_gram,
    fit_crps_weights,
    pool_members,
    random_flip_rot90,
    select_members,
)

TINY = dict(epochs=3, n_members=2, n_components=3, conv_channels=[8, 16], dense_units=[16],
            batch_size=128, progress=False, device="cpu", seed=5)
_counter = iter(range(10**6))


def _name(prefix):
    return f"cnn_{prefix}_{next(_counter)}"


@pytest.fixture(scope="module")
def dc2():
    try:
        ds = load_dc2(n_train=1500, n_test=400, seed=21)
    except FileNotFoundError as err:  # pragma: no cover
        pytest.skip(str(err))
    ds.train = add_synthetic_stamps(ds.train, ds.bands, ds.mag_limits, size=16, seed=1)
    ds.test = add_synthetic_stamps(ds.test, ds.bands, ds.mag_limits, size=16, seed=2)
    return ds


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # stages without an explicit model path write there


def _cat_config(ds):
    cfg = ds.catalog_config()
    cfg.pop("ref_band")
    return cfg


@pytest.fixture(scope="module")
def trained(dc2, tmp_path_factory):
    path = tmp_path_factory.mktemp("cnn") / "cnn_model.pkl"
    inf = DeepzCNNInformer.make_stage(name=_name("inf"), model=str(path), **_cat_config(dc2), **TINY)
    inf.inform(dc2.train)
    return inf, path


def _estimate(model, data, **kw):
    kw.setdefault("hdf5_groupname", "")
    kw.setdefault("output_mode", "return")
    kw.setdefault("device", "cpu")
    est = DeepzCNNEstimator.make_stage(name=_name("est"), model=model, **kw)
    return est.estimate(data).data


# ------------------------------------------------------------------ images module


def _imgs(n=4, c=3, h=8, w=8, dtype=np.float32):
    return np.random.default_rng(0).normal(size=(n, c, h, w)).astype(dtype)


def test_image_validation_errors_name_the_column_or_option():
    good = {"stamps": _imgs()}
    out = validate_images(good, "stamps", 3, (8, 8))
    assert out.dtype == np.float32 and out.shape == (4, 3, 8, 8)
    with pytest.raises(BadImageError, match="'pix'.*image_col"):
        validate_images(good, "pix", 3)
    with pytest.raises(BadImageError, match="'x'.*shape"):
        validate_images({"x": np.zeros((4, 8, 8), np.float32)}, "x", 3)
    with pytest.raises(BadImageError, match=r"'stamps' has 3 band.*4 are expected.*image_bands"):
        validate_images(good, "stamps", 4)
    with pytest.raises(BadImageError, match=r"'stamps' has 8x8.*16x16"):
        validate_images(good, "stamps", 3, (16, 16))
    with pytest.raises(BadImageError, match="'i'.*dtype int"):
        validate_images({"i": _imgs().astype(np.int32)}, "i", 3)
    bad = _imgs()
    bad[1, 0, 2, 2] = np.nan
    bad[3, 2, 0, 0] = np.inf
    with pytest.raises(BadImageError, match=r"'b'.*2 NaN/inf.*\[1, 3\].*bad_pixel_policy"):
        validate_images({"b": bad}, "b", 3)
    fixed = validate_images({"b": bad}, "b", 3, bad_pixel_policy="zero")
    assert np.all(np.isfinite(fixed)) and fixed[1, 0, 2, 2] == 0 and fixed[3, 2, 0, 0] == 0
    with pytest.raises(ValueError, match="bad_pixel_policy"):
        validate_images(good, "stamps", 3, bad_pixel_policy="ignore")


def test_preprocessing_scale_and_colour_channels():
    rng = np.random.default_rng(1)
    noise = np.array([0.5, 2.0, 4.0])
    imgs = (rng.normal(size=(200, 3, 8, 8)) * noise[None, :, None, None]).astype(np.float32)
    scale = fit_image_scale(imgs)
    np.testing.assert_allclose(scale, noise, rtol=0.05)
    out = preprocess_images(imgs, scale, colors=True)
    assert out.shape == (200, 5, 8, 8) and out.dtype == np.float32
    a = np.arcsinh(imgs / scale[None, :, None, None].astype(np.float32))
    np.testing.assert_allclose(out[:, 3], a[:, 0] - a[:, 1], rtol=1e-5, atol=1e-5)
    # far above the noise the colour channel is the log of the flux ratio
    bright = np.full((1, 2, 1, 1), 1e4, np.float32)
    bright[0, 1] = 1e3
    col = preprocess_images(bright, [1.0, 1.0], colors=True)[0, 2, 0, 0]
    assert abs(col - np.log(10.0)) < 1e-3


def test_synthetic_stamp_flux_matches_catalog_and_size_shrinks_with_z():
    mags = np.array([[22.0, 23.0, 24.5], [21.0, 21.5, 22.0], [99.0, 23.0, 23.0]])
    z = np.array([0.5, 1.0, 2.0])
    stamps = synthetic_stamps(mags, z, [26.0, 26.0, 26.0], size=16, noise=False, size_scatter=0.0)
    assert stamps.shape == (3, 3, 16, 16)
    flux = mag_to_njy(mags)
    assert flux[2, 0] == 0.0  # the 99 non-detection has no flux
    sums = stamps.sum(axis=(2, 3))
    ok = flux > 0
    np.testing.assert_allclose(sums[ok], flux[ok], rtol=0.03)
    # half-light radius shrinks with redshift: larger central pixel fraction at higher z
    prof = exponential_stamps(np.array([3.0, 1.5, 0.75]), size=16)
    centre = prof[:, 7:9, 7:9].sum(axis=(1, 2))
    assert centre[0] < centre[1] < centre[2]
    # noise at each band's depth: deeper band -> smaller pixel noise
    noisy = synthetic_stamps(mags[:1].repeat(400, 0), z[:1].repeat(400), [24.0, 27.0, 26.0], seed=3)
    corner = noisy[:, :, :3, :3].reshape(400, 3, -1)
    std = corner.transpose(1, 0, 2).reshape(3, -1).std(axis=1)
    assert std[1] < std[2] < std[0]


def test_add_synthetic_stamps_column(dc2):
    imgs = dc2.train["images"]
    assert imgs.shape == (len(dc2.train["redshift"]), 6, 16, 16) and imgs.dtype == np.float32
    with pytest.raises(KeyError, match="mag_y_lsst"):
        add_synthetic_stamps({k: v for k, v in dc2.test.items() if k != "mag_y_lsst"}, dc2.bands, dc2.mag_limits)


def test_augmentation_keeps_catalog_and_pixel_set():
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    img = torch.randn(5, 3, 8, 8)
    for _ in range(6):
        xo, io = random_flip_rot90([x, img])
        assert xo is x and io.shape == img.shape
        torch.testing.assert_close(torch.sort(io.flatten(1))[0], torch.sort(img.flatten(1))[0])


# ------------------------------------------------------------------ stages


def test_trained_ensemble_pdfs(trained, dc2):
    inf, path = trained
    m = inf.model
    assert m["method"] == "cnn" and len(m["member_state_dicts"]) == 2
    assert m["images"]["bands"] == dc2.bands and (m["images"]["height"], m["images"]["width"]) == (16, 16)
    assert len(m["images"]["scale"]) == 6 and all(s > 0 for s in m["images"]["scale"])
    np.testing.assert_allclose(sum(m["member_weights"]), 1.0)
    ens = _estimate(inf.get_handle("model"), dc2.test)
    z = dc2.test["redshift"]
    assert ens.npdf == len(z)
    assert ens.objdata["weights"].shape == (len(z), 2 * 3)
    # exact: mass inside [zmin, zmax] by qp's mixture CDF + reported p_outside = weight sum = 1
    np.testing.assert_allclose(ens.objdata["weights"].sum(1), 1.0, atol=1e-5)
    inside = np.ravel(ens.cdf(3.0) - ens.cdf(0.0))
    np.testing.assert_allclose(inside + ens.ancil["p_outside"], 1.0, atol=1e-5)
    for key in ("zmode", "zmean", "zmedian", "zstd"):
        assert np.all(np.isfinite(ens.ancil[key]))
    # learnt something after 3 epochs: beats the constant training median in |dz|
    base = np.median(np.abs(np.median(dc2.train["redshift"]) - z))
    assert np.median(np.abs(ens.ancil["zmedian"] - z)) < base


def test_save_load_model_file_in_new_stage_chunked(trained, dc2, tmp_path):
    inf, path = trained
    assert path.exists()
    model = load_model(path)
    for sd in model["member_state_dicts"]:
        assert all(v.device.type == "cpu" for v in sd.values())
    test = {k: v[:300] for k, v in dc2.test.items()}
    here = _estimate(inf.get_handle("model"), test)
    loaded = _estimate(str(path), test)
    np.testing.assert_allclose(loaded.ancil["zmean"], here.ancil["zmean"], rtol=1e-5)
    infile = tmp_path / "in.hdf5"
    tables_io.write({"photometry": test}, str(infile))
    chunked = _estimate(str(path), TableHandle("input", path=str(infile)), hdf5_groupname="photometry",
                        chunk_size=128, output_mode="default", output=str(tmp_path / "out.hdf5"))
    import qp

    out = qp.read(str(tmp_path / "out.hdf5"))
    assert out.npdf == 300
    np.testing.assert_allclose(np.ravel(out.ancil["zmean"]), here.ancil["zmean"], rtol=1e-5, atol=1e-6)
    del chunked


def test_wrong_images_at_estimate_are_refused(trained, dc2):
    inf, _ = trained
    test = {k: v[:50] for k, v in dc2.test.items()}
    with pytest.raises(BadImageError, match=r"'images' has 5 band.*6 are expected"):
        _estimate(inf.get_handle("model"), dict(test, images=test["images"][:, :5]))
    with pytest.raises(BadImageError, match=r"8x8.*16x16"):
        _estimate(inf.get_handle("model"), dict(test, images=test["images"][:, :, :8, :8]))
    with pytest.raises(BadImageError, match="'stamps'"):
        _estimate(inf.get_handle("model"), test, image_col="stamps")
    bad = test["images"].copy()
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(BadImageError, match="NaN/inf"):
        _estimate(inf.get_handle("model"), dict(test, images=bad))
    ens = _estimate(inf.get_handle("model"), dict(test, images=bad), bad_pixel_policy="zero")
    assert np.all(np.isfinite(ens.ancil["zmean"]))


def test_model_trained_on_other_bands_is_refused(trained, dc2):
    inf, _ = trained
    with pytest.raises(BadPhotometryError, match="trained on bands"):
        _estimate(inf.get_handle("model"), dc2.test, bands=dc2.bands[1:], err_bands=dc2.err_bands[1:])
    with pytest.raises(BadPhotometryError, match="image_bands"):
        _estimate(inf.get_handle("model"), dc2.test, image_bands=["u", "g", "r", "i", "z", "y"])


def test_catalog_only_mode_runs_without_images(dc2):
    table = {k: v for k, v in dc2.train.items() if k != "images"}
    inf = DeepzCNNInformer.make_stage(name=_name("inf"), **_cat_config(dc2),
                                      **dict(TINY, use_images=False, n_members=1, loss="nll"))
    inf.inform(table)
    assert inf.model["arch"]["use_images"] is False and inf.model["member_losses"] == ["nll"]
    test = {k: v[:100] for k, v in dc2.test.items() if k != "images"}
    ens = _estimate(inf.get_handle("model"), test, qp_representation="interp")
    assert ens.npdf == 100 and np.all(np.isfinite(ens.ancil["zmedian"]))


def test_loss_both_and_inverse_weighting(dc2):
    table = {k: v[:600] for k, v in dc2.train.items()}
    inf = DeepzCNNInformer.make_stage(name=_name("inf"), **_cat_config(dc2),
                                      **dict(TINY, epochs=1, loss="both", member_weighting="inverse_val_crps",
                                             conv_channels=[4], augment=False))
    inf.inform(table)
    m = inf.model
    assert m["member_losses"] == ["crps", "nll"]
    inv = 1 / np.asarray(m["member_val_crps"])
    np.testing.assert_allclose(m["member_weights"], inv / inv.sum(), rtol=1e-6)


def test_training_images_checked_and_config_errors(dc2):
    table = {k: v[:200] for k, v in dc2.train.items()}
    inf = DeepzCNNInformer.make_stage(name=_name("inf"), **_cat_config(dc2), **dict(TINY, image_bands=["u", "g"]))
    with pytest.raises(BadImageError, match=r"'images' has 6 band.*2 are expected.*\['u', 'g'\]"):
        inf.inform(table)
    with pytest.raises(ValueError, match=r"'n_component'.*did you mean 'n_components'"):
        DeepzCNNInformer.make_stage(name=_name("inf"), n_component=3)
    with pytest.raises(ValueError, match="bogus"):
        DeepzCNNEstimator.make_stage(name=_name("est"), bogus=1)
    with pytest.raises(ValueError, match="qp_representation"):
        DeepzCNNEstimator.make_stage(name=_name("est"), qp_representation="hist")
    with pytest.raises(ValueError, match="'loss'"):  # refused when the stage is made
        DeepzCNNInformer.make_stage(name=_name("inf"), **_cat_config(dc2), **dict(TINY, loss="mse"))
    small = DeepzCNNInformer.make_stage(name=_name("inf"), **_cat_config(dc2),
                                        **dict(TINY, conv_channels=[4, 4, 4, 4, 4]))
    with pytest.raises(BadImageError, match="too small.*conv_channels"):
        small.inform(table)


def test_seed_makes_training_deterministic(dc2):
    table = {k: v[:300] for k, v in dc2.train.items()}
    cfg = dict(TINY, epochs=1, n_members=1, conv_channels=[4], augment=True)
    models = []
    for _ in range(2):
        inf = DeepzCNNInformer.make_stage(name=_name("inf"), **_cat_config(dc2), **cfg)
        inf.inform(table)
        models.append(inf.model["member_state_dicts"][0])
    for k in models[0]:
        torch.testing.assert_close(models[0][k], models[1][k], rtol=0, atol=0)


def test_default_config_is_the_seed_ensemble(trained):
    m = trained[0].model
    assert m["ensemble"] == "seeds" and "pool" not in m
    assert m["member_n_components"] == [3, 3] and m["member_losses"] == ["crps", "crps"]
    np.testing.assert_allclose(m["member_weights"], [0.5, 0.5])


# ------------------------------------------------------------ error-aware augmentation

AUG = dict(TINY, epochs=2, n_members=2, conv_channels=[4], augment=False)


def test_augment_options_are_checked_and_say_what_the_stamps_get(dc2):
    cat = _cat_config(dc2)
    with pytest.raises(ValueError, match=r"augment_depth.*\['mag_Y'\].*not in 'bands'"):  # refused when made
        DeepzCNNInformer.make_stage(name=_name("inf"), **cat, **AUG, augment_depth={"mag_Y": 24.0})
    for bad in ("deep", float("nan"), 80.0, True):
        with pytest.raises(ValueError, match="augment_depth.*mag_z_lsst"):
            DeepzCNNInformer.make_stage(name=_name("inf"), **cat, **AUG, augment_depth={"mag_z_lsst": bad})
    with pytest.raises(ValueError, match="augment_errors"):
        DeepzCNNInformer.make_stage(name=_name("inf"), **cat, **AUG, augment_errors="yes")
    opts = DeepzCNNInformer.config_options
    for key in ("augment_errors", "augment_depth"):  # the decision about the images is in the help
        assert "image stamps" in opts[key].msg and "extra_features" in opts[key].msg


def _capture_epochs(monkeypatch, n_epochs):
    """Replace rail.deepz.training.train_model (which deepz_cnn imports when it trains) by a
    wrapper that records, per member, the training inputs and ``n_epochs`` draws of its resampler
    (then trains as usual)."""
    import rail.deepz.training as mod

    real = getattr(mod.train_model, "real", mod.train_model)  # not an earlier spy of this test
    calls = []

    def spy(net, loss, train_inputs, *args, resample=None, **kw):
        draws = [resample(e) for e in range(n_epochs)] if resample is not None else []
        calls.append({"train": train_inputs, "draws": draws})
        return real(net, loss, train_inputs, *args, resample=resample, **kw)

    spy.real = real
    monkeypatch.setattr(mod, "train_model", spy)
    return calls


def test_augmentation_redraws_catalog_features_each_epoch_within_their_errors(dc2, monkeypatch):
    """The catalog branch's magnitudes are redrawn each epoch as N(f, sigma_f) in flux (mean within
    the errors); the stamps and the extra_features columns stay the measured ones; members draw
    from their own seeds, and the draws repeat with the same seed."""
    rng = np.random.default_rng(0)
    table = {k: v[:1000] for k, v in dc2.train.items()}
    table["extra_col"] = rng.normal(size=1000)
    cfg = dict(AUG, epochs=1, extra_features=["extra_col"], augment_errors=True)
    runs = []
    for _ in range(2):
        calls = _capture_epochs(monkeypatch, 6)
        inf = DeepzCNNInformer.make_stage(name=_name("inf"), **_cat_config(dc2), **cfg)
        inf.inform(table)
        runs.append(calls)
    calls = runs[0]
    assert len(calls) == 2 and all(len(c["draws"]) == 6 for c in calls)
    for a, b in zip(calls, runs[1]):  # seeded: the same draws again
        for da, db in zip(a["draws"], b["draws"]):
            np.testing.assert_array_equal(da[0], db[0])
    assert not np.array_equal(calls[0]["draws"][0][0], calls[1]["draws"][0][0])  # members: own seeds
    nb = len(dc2.bands)
    scaler = Standardizer.from_dict(inf.model["scalers"]["x"])
    measured = calls[0]["train"][0] * scaler.std + scaler.mean  # unscaled features of the training rows
    m, err = measured[:, :nb].astype(np.float64), measured[:, 2 * nb - 1:3 * nb - 1].astype(np.float64)
    draws = [d[0] * scaler.std + scaler.mean for d in calls[0]["draws"]]
    for d in calls[0]["draws"]:
        assert d[1] is calls[0]["train"][1]  # the measured (preprocessed) stamps, every epoch
        np.testing.assert_array_equal(d[0][:, -1], calls[0]["train"][0][:, -1])  # extra column untouched
    assert not np.allclose(draws[0][:, :nb], draws[1][:, :nb])  # a new realisation each epoch
    # bright detections (S/N > 10): no draw is lost, flux offsets are N(0, sigma_f)
    f = mag_to_flux(m)
    sig = mag_err_to_flux_err(f, err)
    sel = (err > 0.003) & (err < 0.1)
    zs = np.stack([(mag_to_flux(d[:, :nb].astype(np.float64)) - f) / sig for d in draws])[:, sel]
    n = zs.size
    assert n > 5000
    # (+0.01: the draws are read back from float32 standardised features)
    assert abs(zs.mean()) < 6 / np.sqrt(n) and abs(zs.std() - 1) < 6 / np.sqrt(2 * n) + 0.01
    # per object, the mean of the draws lies within its error of the measurement (6 standard errors)
    assert np.all(np.abs(zs.mean(axis=0)) < 6 / np.sqrt(len(draws)))


def test_augmented_cnn_trains_deterministically_and_estimates(dc2):
    table = {k: v[:600] for k, v in dc2.train.items()}
    aug = dict(AUG, augment_errors=True, augment_depth={"mag_z_lsst": 24.0})
    models = []
    for cfg in (aug, aug, AUG):
        inf = DeepzCNNInformer.make_stage(name=_name("inf"), **_cat_config(dc2), **cfg)
        inf.inform(table)
        models.append(inf)
    a, b, plain = (i.model["member_state_dicts"] for i in models)
    for ma, mb in zip(a, b):  # seeded, one thread: bit for bit
        for k in ma:
            torch.testing.assert_close(ma[k], mb[k], rtol=0, atol=0)
    assert any(not torch.equal(a[0][k], plain[0][k]) for k in a[0] if a[0][k].is_floating_point())
    test = {k: v[:150] for k, v in dc2.test.items()}
    ens = _estimate(models[0].get_handle("model"), test)
    assert ens.npdf == 150 and pdf_ok(ens, MASS_TOL, (0.0, 3.0)).all()
    assert np.all(np.isfinite(ens.ancil["zmode"]))


def test_augment_depth_degrades_the_validation_catalog_branch_only(dc2, capture_validation):
    """With augment_depth the validation split's catalog features are degraded once to the test
    depth (the same for both members and for the seed); its stamps stay the measured ones;
    augment_errors alone leaves the validation split measured."""
    table = {k: v[:600] for k, v in dc2.train.items()}
    runs = {}
    for label, extra in (("plain", {}), ("errors", {"augment_errors": True}),
                         ("depth", {"augment_depth": {"mag_i_lsst": 23.0}}),
                         ("depth_again", {"augment_depth": {"mag_i_lsst": 23.0}})):
        calls = capture_validation()
        DeepzCNNInformer.make_stage(name=_name("inf"), **_cat_config(dc2), **dict(AUG, epochs=1, **extra)).inform(table)
        assert len(calls) == 2
        for a, b in zip(*calls):  # one validation copy for both members
            np.testing.assert_array_equal(a, b)
        runs[label] = calls[0]
    for a, b in zip(runs["errors"], runs["plain"]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(runs["depth"], runs["depth_again"]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(runs["depth"][0], runs["plain"][0])
    assert len(runs["depth"]) == 2  # catalog features and stamps
    for a, b in zip(runs["depth"][1:], runs["plain"][1:]):  # the stamps: measured
        np.testing.assert_array_equal(a, b)


def test_augmented_pool_members_draw_with_their_own_seeds(dc2, monkeypatch):
    import rail.estimation.algos.deepz_cnn as mod

    real, seeds = mod.make_resampler, []

    def spy(config, settings, phot, rows, seed, make_inputs):
        seeds.append(seed)
        return real(config, settings, phot, rows, seed, make_inputs)

    monkeypatch.setattr(mod, "make_resampler", spy)
    table = {k: v[:400] for k, v in dc2.train.items()}
    inf = DeepzCNNInformer.make_stage(name=_name("inf"), **_cat_config(dc2), **dict(POOL, augment_errors=True))
    inf.inform(table)
    pool = inf.model["pool"]
    assert seeds == [s["seed"] for s in pool["members"]] == list(range(5, 9))
    assert len(pool["selected"]) == 2 and abs(sum(inf.model["member_weights"]) - 1) < 1e-9


# ------------------------------------------------------------------ PICZL's pool recipe


def _gauss(mu, sigma, k=1):
    """Mixtures (w, mu, sigma) of N objects with k equal components at ``mu`` (N,)."""
    mu = np.asarray(mu, float)[:, None].repeat(k, 1)
    return np.full_like(mu, 1.0 / k), mu, np.full_like(mu, float(sigma))


def test_pool_members_cover_the_grid_loss_fastest():
    from types import SimpleNamespace

    cfg = SimpleNamespace(pool_losses=["crps", "nll"], pool_n_components=[2, 4], pool_lrs=[1e-3, 1e-4],
                          pool_batch_sizes=[], pool_size=0, loss="crps", n_components=5, lr=1e-3,
                          batch_size=64, seed=7)
    specs = pool_members(cfg)
    assert len(specs) == 8 and len({(s.loss, s.n_components, s.lr) for s in specs}) == 8
    assert [s.loss for s in specs[:4]] == ["crps", "nll", "crps", "nll"]
    assert [s.seed for s in specs] == list(range(7, 15)) and {s.batch_size for s in specs} == {64}
    cfg.pool_size = 10  # cycles with new seeds
    specs = pool_members(cfg)
    assert len(specs) == 10 and specs[8].n_components == specs[0].n_components and specs[8].seed == 15


def test_selection_is_forward_on_outlier_rate():
    z = np.linspace(0.2, 1.8, 200)
    far = z + 0.5 * (1 + z)  # an outlier everywhere it is used
    # member 0: outliers on the first 30% of objects; 1: on the last 30%; 2: on the first 35%;
    # 3: on the first 10% -- the best alone; its best partner (fewest joint outliers of the mode) is 1
    def member(frac_lo, frac_hi):
        mu = z.copy()
        n = len(z)
        mu[int(frac_lo * n):int(frac_hi * n)] = far[int(frac_lo * n):int(frac_hi * n)]
        return _gauss(mu, 0.01)
    params = [member(0, 0.3), member(0.7, 1.0), member(0, 0.35), member(0, 0.1)]
    single = [eta(p[1][:, 0], z) for p in params]
    chosen, trace = select_members(params, z, 2, 0.0, 3.0)
    assert chosen[0] == int(np.argmin(single)) == 3
    # with 3 + m equally weighted the mode is the narrower/denser peak; check the rule, not a value:
    # the second choice is the candidate with the lowest ensemble eta
    etas = {i: select_members([params[3], params[i]], z, 2, 0.0, 3.0)[1][1]["eta"] for i in (0, 1, 2)}
    assert trace[1]["eta"] == min(etas.values()) and chosen[1] in [i for i, e in etas.items() if e == min(etas.values())]
    assert len(set(chosen)) == 2
    # balanced losses: with member 3 a 'crps' member the next must be an 'nll' one, even if worse
    chosen_b, _ = select_members(params, z, 2, 0.0, 3.0, losses=["crps", "crps", "nll", "crps"])
    assert chosen_b == [3, 2]
    with pytest.raises(ValueError, match="n_select"):
        select_members(params, z, 5, 0.0, 3.0)


def test_crps_weights_minimise_the_mixture_crps():
    rng = np.random.default_rng(3)
    z = rng.uniform(0.1, 2.0, 300)
    params = [_gauss(z + rng.normal(0, 0.05, z.size), 0.05, 2), _gauss(z + 0.2, 0.3),
              _gauss(z + rng.normal(0, 0.2, z.size), 0.02, 3)]
    g = crps_gram(params, z)
    for a in (np.array([0.2, 0.3, 0.5]), np.array([1.0, 0.0, 0.0])):  # a^T G a is the mixture's CRPS
        w = np.concatenate([p[0] * c for p, c in zip(params, a)], 1)
        mu, sig = np.concatenate([p[1] for p in params], 1), np.concatenate([p[2] for p in params], 1)
        np.testing.assert_allclose(a @ g @ a, np.mean(gmm_crps_numpy(w, mu, sig, z)), rtol=1e-9)
    a = fit_crps_weights(params, z)
    assert np.all(a >= 0) and abs(a.sum() - 1) < 1e-12
    best = a @ g @ a
    assert best <= np.full(3, 1 / 3) @ g @ np.full(3, 1 / 3) + 1e-12
    assert best <= np.min(np.diag(g)) + 1e-9  # no worse than any single member
    assert best <= min(v @ g @ v for v in rng.dirichlet(np.ones(3), 200)) + 1e-9


POOL = dict(TINY, epochs=1, conv_channels=[4], augment=False, ensemble="pool", pool_losses=["crps", "nll"],
            pool_n_components=[2, 4], pool_lrs=[1e-3], n_select=2)


@pytest.fixture(scope="module")
def pool_trained(dc2, tmp_path_factory):
    path = tmp_path_factory.mktemp("cnnpool") / "cnn_pool.pkl"
    table = {k: v[:600] for k, v in dc2.train.items()}
    inf = DeepzCNNInformer.make_stage(name=_name("inf"), model=str(path), **_cat_config(dc2), **POOL)
    inf.inform(table)
    return inf, path


def test_pool_trains_selects_and_weights(pool_trained, dc2):
    inf, path = pool_trained
    m = inf.model
    pool = m["pool"]
    assert m["ensemble"] == "pool" and len(pool["members"]) == 4
    assert {(s["loss"], s["n_components"]) for s in pool["members"]} == {
        ("crps", 2), ("nll", 2), ("crps", 4), ("nll", 4)}
    sel = pool["selected"]
    assert len(sel) == 2 == len(set(sel)) == len(m["member_state_dicts"])
    # the first pick is the member with the lowest validation outlier rate (ties: lowest validation CRPS)
    assert sel[0] == int(np.lexsort((pool["val_crps"], pool["val_eta"]))[0])
    assert sorted(m["member_losses"]) == ["crps", "nll"]  # pool_balance_losses
    assert m["member_n_components"] == [pool["members"][i]["n_components"] for i in sel]
    w = np.asarray(m["member_weights"])
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-9
    test = {k: v[:200] for k, v in dc2.test.items()}
    ens = _estimate(str(path), test)  # the saved (weights_only) file
    assert ens.objdata["weights"].shape == (200, sum(m["member_n_components"]))
    np.testing.assert_allclose(ens.objdata["weights"].sum(1), 1.0, atol=1e-5)
    inside = np.ravel(ens.cdf(3.0) - ens.cdf(0.0))
    np.testing.assert_allclose(inside + ens.ancil["p_outside"], 1.0, atol=1e-5)
    assert load_model(path)["pool"]["selected"] == sel


def test_pool_model_mismatches_are_refused(pool_trained, dc2):
    inf, _ = pool_trained
    test = {k: v[:20] for k, v in dc2.test.items()}
    good = inf.model
    bad_cases = {
        r"'member_weights' has 1 value.*2 member": dict(good, member_weights=[1.0]),
        r"'member_weights'.*sum to 1": dict(good, member_weights=[0.7, 0.7]),
        r"'member_weights'.*>= 0": dict(good, member_weights=[1.5, -0.5]),
        r"'member_n_components' has 3": dict(good, member_n_components=[2, 4, 4]),
        r"member 0's weights do not fit.*member_n_components\[0\]=7": dict(
            good, member_n_components=[7, good["member_n_components"][1]]),
    }
    for pattern, model in bad_cases.items():
        with pytest.raises(ModelFormatError, match=pattern):
            _estimate(model, test)


def test_pool_config_errors(dc2):
    with pytest.raises(ValueError, match=r"'n_select'=5 exceeds the pool size 4"):
        DeepzCNNInformer.make_stage(name=_name("inf"), **_cat_config(dc2), **dict(POOL, n_select=5))
    with pytest.raises(ValueError, match=r"pool_losses\[1\]"):
        DeepzCNNInformer.make_stage(name=_name("inf"), **_cat_config(dc2), **dict(POOL, pool_losses=["crps", "mse"]))
    with pytest.raises(ValueError, match="pool_lrs"):
        DeepzCNNInformer.make_stage(name=_name("inf"), **_cat_config(dc2), **dict(POOL, pool_lrs=[0.0]))
    with pytest.raises(ValueError, match="'ensemble'"):
        DeepzCNNInformer.make_stage(name=_name("inf"), **_cat_config(dc2), **dict(POOL, ensemble="bag"))


# ------------------------------------------------------------------ PICZL's DR10 input format


@pytest.fixture(scope="module")
def dr10():
    try:
        return load_legacy_dr10()
    except FileNotFoundError as err:  # pragma: no cover
        pytest.skip(str(err))


def test_dr10_loader_shapes_bands_units(dr10):
    table, info = dr10
    img = table["images"]
    assert img.shape == (50, 4, 23, 23) and img.dtype == np.float32
    assert info["image_bands"] == ["g", "r", "i", "z"] and info["input_units"] == "nanomaggies"
    assert len(PICZL_FEATURES) == 52 and all(np.isfinite(table[c]).all() for c in PICZL_FEATURES)
    types = np.stack([table[f"type_{t}"] for t in ("PSF", "REX", "DEV", "EXP", "SER")], 1)
    np.testing.assert_array_equal(types.sum(1), 1.0)
    assert np.all((table["redshift"] > 0) & (table["redshift"] < 1))
    # units: a 23x23 (6") stamp holds a large part of the catalogue's total flux, both in nanomaggies
    # (nJy would be 3631x off); the extended galaxies spill out, so the fraction is below 1
    for j, b in enumerate("griz"):
        ratio = np.median(img[:, j].sum((1, 2)) / table[f"flux_{b}"])
        assert 0.3 < ratio < 1.2, (b, ratio)
    # object-first reordering: observed = Tractor model + residual, object by object
    full, finfo = read_piczl_inputs(Path(DATA_DR10()), ("observed", "model", "residual"))
    assert finfo["image_bands"][4:8] == ["model_g", "model_r", "model_i", "model_z"]
    o, mo, r = full["images"][:, :4], full["images"][:, 4:8], full["images"][:, 8:]
    rel = np.abs(o - mo - r).max(axis=(2, 3)) / np.abs(o).max(axis=(2, 3))
    assert np.median(rel) < 0.05


def DATA_DR10():
    from rail.deepz.datasets import require_shared

    return require_shared("legacy_dr10_demo")


def test_dr10_malformed_files_are_refused(dr10, tmp_path):
    src = DATA_DR10()
    obs = np.load(src / "processed_dered_griz_images.npy")

    def folder(name, arr=None, catalog=True):
        d = tmp_path / name
        d.mkdir()
        if catalog:
            (d / "demo_catalog_train_with_z.fits").symlink_to(src / "demo_catalog_train_with_z.fits")
        if arr is not None:
            np.save(d / "processed_dered_griz_images.npy", arr)
        return d

    with pytest.raises(BadImageError, match=r"3 band\(s\) on axis 0 but 4.*\['g', 'r', 'i', 'z'\]"):
        read_piczl_inputs(folder("band", obs[:3]))
    with pytest.raises(BadImageError, match=r"22x23 pixel stamps; 23x23"):
        read_piczl_inputs(folder("shape", obs[:, :, :22]))
    with pytest.raises(BadImageError, match=r"49 object\(s\) on axis 1.*50 row"):
        read_piczl_inputs(folder("rows", obs[:, :49]))
    with pytest.raises(BadImageError, match=r"shape \(bands, objects, height, width\)"):
        read_piczl_inputs(folder("ndim", obs[0]))
    with pytest.raises(BadImageError, match="not a plain numeric array"):
        read_piczl_inputs(folder("pickle", np.array([obs, None], dtype=object)))
    with pytest.raises(FileNotFoundError, match="dered_griz_models"):
        read_piczl_inputs(folder("nomodel", obs), ("observed", "model"))
    with pytest.raises(ValueError, match="planes"):
        read_piczl_inputs(folder("plane", obs), ("colours",))
    d = folder("cat", obs, catalog=False)
    from astropy.table import Table

    t = Table.read(src / "demo_catalog_train_with_z.fits")
    t.remove_column("snr_w2")
    t.write(d / "demo_catalog_train_with_z.fits")
    with pytest.raises(KeyError, match="snr_w2"):
        read_piczl_inputs(d)


@pytest.mark.filterwarnings("ignore::rail.deepz.photometry.BadBandWarning")  # W3/W4: mostly below 5 sigma
def test_dr10_inform_estimate_end_to_end(dr10):
    """The format path, not accuracy: 50 objects train and test the same network."""
    table, info = dr10
    common = dict(bands=info["bands"], err_bands=info["err_bands"], input_units="nanomaggies",
                  mag_limits=info["mag_limits"], missing_policy="limit", redshift_col="redshift",
                  zmin=0.0, zmax=1.0, hdf5_groupname="")
    inf = DeepzCNNInformer.make_stage(
        name=_name("inf"), **common, **dict(POOL, image_bands=info["image_bands"], extra_features=PICZL_FEATURES,
                                            conv_channels=[8, 16], batch_size=16, val_fraction=0.2))
    inf.inform(table)
    m = inf.model
    assert m["arch"]["n_features"] == 8 + 7 + 8 + 52 and m["images"]["height"] == 23
    ens = _estimate(inf.get_handle("model"), table, bands=info["bands"], err_bands=info["err_bands"])
    assert ens.npdf == 50
    np.testing.assert_allclose(ens.objdata["weights"].sum(1), 1.0, atol=1e-5)
    for key in ("zmode", "zmedian", "zmean"):
        assert np.all(np.isfinite(ens.ancil[key]))
    with pytest.raises(KeyError, match=r"\['snr_w3'\].*extra_features"):
        _estimate(inf.get_handle("model"), {k: v for k, v in table.items() if k != "snr_w3"})
    bad = dict(table, dchisq_2=np.where(np.arange(50) == 4, np.nan, table["dchisq_2"]))
    with pytest.raises(ValueError, match=r"\['dchisq_2'\].*1 NaN"):
        _estimate(inf.get_handle("model"), bad)
