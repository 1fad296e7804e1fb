"""Tests of image handling (rail.deepz.images) and the image CNN + GMM ensemble stages."""


import numpy as np
import pytest
import tables_io
import torch
from rail.core.data import TableHandle

from rail.deepz.datasets import load_dc2
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
from rail.deepz.photometry import BadPhotometryError
from rail.estimation.algos.deepz_cnn import DeepzCNNEstimator, DeepzCNNInformer, random_flip_rot90

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
