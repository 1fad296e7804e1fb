"""Bad input values, option validation, empty tables and missing_policy='mask' (issue 15).

Tiny data (a few hundred DC2 rows from pz-rail-base) and a few epochs: these tests check
what the code guarantees (a value is refused, hidden, or handled bit-identically), not
accuracy.
"""

import copy
import warnings

import numpy as np
import pytest
import qp
import tables_io
from rail.core.data import TableHandle

from rail.deepz.datasets import load_dc2
from rail.deepz.photometry import (
    BAD_BAND_WARN_FRACTION,
    BadBandWarning,
    BadPhotometryError,
    Photometry,
    extract_photometry,
)
from rail.estimation.algos.deepz_cnn import DeepzCNNEstimator, DeepzCNNInformer
from rail.estimation.algos.deepz_embed import DeepzEmbedEstimator, DeepzEmbedInformer
from rail.estimation.algos.deepz_somflag import DeepzSOMFlagger, DeepzSOMFlagInformer
from rail.estimation.algos.deepz_lstm import DeepzLSTMEstimator, DeepzLSTMInformer
from rail.estimation.algos.deepz_nnc import DeepzNNCEstimator, DeepzNNCInformer

INFORMERS = [DeepzNNCInformer, DeepzLSTMInformer, DeepzEmbedInformer, DeepzCNNInformer, DeepzSOMFlagInformer]
ESTIMATORS = [DeepzNNCEstimator, DeepzLSTMEstimator, DeepzEmbedEstimator, DeepzCNNEstimator, DeepzSOMFlagger]

_counter = iter(range(10**6))


def _name(prefix="s"):
    return f"{prefix}_iv_{next(_counter)}"


@pytest.fixture(scope="module")
def dc2():
    return load_dc2(n_train=500, n_test=60, seed=5)


def _table(mags, errs=None, names=("a", "b", "c")):
    mags = np.atleast_2d(np.asarray(mags, dtype=float))
    errs = np.full_like(mags, 0.1) if errs is None else np.atleast_2d(np.asarray(errs, dtype=float))
    data = {n: mags[:, i] for i, n in enumerate(names)}
    data.update({f"e_{n}": errs[:, i] for i, n in enumerate(names)})
    return data


BANDS, EBANDS = ["a", "b", "c"], ["e_a", "e_b", "e_c"]
LIMITS = {"a": 26.0, "b": 27.0, "c": 25.0}


# ----------------------------------------------------------------- bad values


@pytest.mark.parametrize("value", [-99.0, 0.0, -1e30, 1e30, 50.0, np.nan, np.inf])
def test_absurd_magnitudes_are_bad_even_with_raise(value):
    rows = [[22.0, 23.0, 21.0], [value, 23.0, 21.0]]
    with pytest.raises(BadPhotometryError, match="'a'.*1 bad value"):
        extract_photometry(_table(rows), BANDS, EBANDS, mag_limits=LIMITS, missing_policy="raise")
    phot = extract_photometry(_table(rows), BANDS, EBANDS, mag_limits=LIMITS, missing_policy="limit")
    assert phot.valid[:, 0].tolist() == [True, False]
    assert phot.mags[1, 0] == np.float32(LIMITS["a"]) and phot.errs[1, 0] == 1.0


@pytest.mark.filterwarnings("ignore::rail.deepz.photometry.BadBandWarning")
def test_sentinel_list_and_range():
    rows = [[99.0, 23.0, 21.0], [-99.0, 23.0, 21.0], [-9999.0, 23.0, 21.0], [22.0, 23.0, 21.0],
            [24.995, 23.0, 21.0]]
    kw = dict(mag_limits=LIMITS, missing_policy="mask")
    phot = extract_photometry(_table(rows), BANDS, EBANDS, nondetect_val=[99, -99, -9999, 25.0], **kw)
    assert phot.valid[:, 0].tolist() == [False, False, False, True, False]  # 24.995 is within 0.01 of 25
    # a narrower valid range makes 22 bad too; a sentinel alone (no range) still catches 99
    phot = extract_photometry(_table(rows), BANDS, EBANDS, valid_mag_range=(22.5, 40), **kw)
    assert phot.valid[:, 0].tolist() == [False, False, False, False, True]


def test_flux_units_negative_and_absurd_fluxes_are_bad():
    rows = [[1000.0, -5.0, 1e30], [1000.0, 99.0, 1000.0]]  # 99 nJy is a real flux (26.4 mag)
    phot = extract_photometry(_table(rows, errs=[[10.0] * 3] * 2), BANDS, EBANDS, mag_limits=LIMITS,
                              missing_policy="mask", input_units="nJy")
    assert phot.valid.tolist() == [[True, False, False], [True, True, True]]


def test_bad_errors_and_negative_error_options():
    rows = [[22.0, 23.0, 21.0]] * 2
    phot = extract_photometry(_table(rows, errs=[[0.1, -99.0, 0.0], [0.1, 0.1, 0.1]]), BANDS, EBANDS,
                              mag_limits=LIMITS)
    assert phot.valid.tolist() == [[True, False, False], [True, True, True]]
    for key in ("nondetect_err", "max_mag_err"):
        with pytest.raises(ValueError, match=key):
            extract_photometry(_table(rows), BANDS, EBANDS, mag_limits=LIMITS, **{key: -1.0})
        with pytest.raises(ValueError, match=key):
            DeepzNNCInformer.make_stage(name=_name(), **{key: -0.5})


def test_band_bad_in_most_rows_warns_naming_it():
    n = 20
    mags = np.tile([22.0, 23.0, 21.0], (n, 1))
    mags[:, 2] = np.nan                       # c: bad in every row
    mags[: int(0.8 * n), 1] = 99.0            # b: bad in 80% of the rows
    mags[:1, 0] = -99.0                       # a: bad in 5%: no warning
    with pytest.warns(BadBandWarning) as rec:
        extract_photometry(_table(mags), BANDS, EBANDS, mag_limits=LIMITS)
    text = " ".join(str(w.message) for w in rec)
    assert "'c'" in text and "20 of 20" in text and "'b'" in text and "16 of 20" in text
    assert "'a'" not in text and BAD_BAND_WARN_FRACTION < 0.8
    with warnings.catch_warnings():
        warnings.simplefilter("error", BadBandWarning)
        extract_photometry(_table(mags[:, :1], names=("a",)), ["a"], ["e_a"], mag_limits=LIMITS)


def test_feature_valid_masks_colours_of_masked_bands():
    phot = Photometry(bands=BANDS, mags=np.zeros((2, 3), np.float32), errs=np.ones((2, 3), np.float32),
                      valid=np.array([[True, False, True], [True, True, True]]))
    fv = phot.feature_valid(["mags", "colors", "valid"])
    assert fv.shape == phot.features(["mags", "colors", "valid"]).shape
    assert fv[0].tolist() == [True, False, True, False, False, True, True, True]
    assert fv[1].all()


# ----------------------------------------------------------------- options


@pytest.mark.parametrize("cls", INFORMERS + ESTIMATORS)
@pytest.mark.parametrize("bad", ["no", "false", "0", 0, 1])
def test_bool_option_refuses_strings_and_numbers(cls, bad):
    with pytest.raises(ValueError, match="'mixed_precision'"):
        cls.make_stage(name=_name(), mixed_precision=bad)


@pytest.mark.parametrize("cls", [DeepzNNCInformer, DeepzEmbedInformer])
def test_list_option_refuses_a_string(cls):
    with pytest.raises(ValueError, match="'hidden_layers'.*not a string"):
        cls.make_stage(name=_name(), hidden_layers="64")


@pytest.mark.parametrize("cls,key,value", [
    (DeepzNNCInformer, "epochs", 0), (DeepzNNCInformer, "epochs", 2.5), (DeepzNNCInformer, "lr", -1e-3),
    (DeepzNNCInformer, "val_fraction", 1.0), (DeepzNNCInformer, "batch_size", "64"),
    (DeepzNNCInformer, "missing_policy", "drop"), (DeepzNNCInformer, "optimizer", "sgd"),
    (DeepzNNCInformer, "valid_mag_range", [30, 10]), (DeepzNNCInformer, "nondetect_val", "99"),
    (DeepzLSTMInformer, "lr_factor", 0.0), (DeepzEmbedInformer, "ae_hidden", "32"),
    (DeepzNNCEstimator, "inference_batch_size", -1), (DeepzNNCEstimator, "nzbins", 2),
    (DeepzLSTMEstimator, "nzbins", 1), (DeepzEmbedEstimator, "som_flags", "yes"),
])
def test_options_checked_by_type_and_range(cls, key, value):
    with pytest.raises(ValueError, match=repr(key)):
        cls.make_stage(name=_name(), **{key: value})


def test_good_options_accepted():
    DeepzNNCInformer.make_stage(name=_name(), epochs=1e2, mixed_precision=np.bool_(False),
                                nondetect_val=[99, -99.0, np.nan], hidden_layers=(8, 4))
    DeepzLSTMEstimator.make_stage(name=_name(), zmin=0.0, zmax=2.0, nzbins=3)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_estimator_inverted_grid_refused(cls):
    with pytest.raises(ValueError, match="'zmax'"):
        cls.make_stage(name=_name(), zmin=2.0, zmax=1.0)


# ----------------------------------------------------------------- tiny trainings

NNC = dict(hidden_layers=[16], nbins=40, epochs=3, batch_size=128, progress=False, hdf5_groupname="", seed=1,
           temperature_scaling=False)
LSTM = dict(lstm_units=[8], dense_units=[8], n_components=3, epochs=2, batch_size=128, progress=False,
            hdf5_groupname="", seed=1, width_calibration="none")
EMBED = dict(hidden_layers=[16], n_components=20, ae_hidden=[8], ae_latent_dim=4, ae_epochs=2, epochs=2,
             batch_size=128, progress=False, hdf5_groupname="", seed=1, som_shape=[3, 3], som_iterations=200,
             som_n_boot=5)
CNN = dict(use_images=False, n_members=1, n_components=3, dense_units=[8], epochs=2, batch_size=128,
           progress=False, hdf5_groupname="", seed=1)
METHODS = {
    "nnc": (DeepzNNCInformer, DeepzNNCEstimator, NNC),
    "lstm": (DeepzLSTMInformer, DeepzLSTMEstimator, LSTM),
    "embed": (DeepzEmbedInformer, DeepzEmbedEstimator, EMBED),
    "cnn": (DeepzCNNInformer, DeepzCNNEstimator, CNN),
}


def _inform(method, dc2, train=None, **kw):
    inf_cls, _, base = METHODS[method]
    cfg = dict(base, bands=dc2.bands, err_bands=dc2.err_bands, mag_limits=dc2.mag_limits)
    cfg.update(kw)
    inf = inf_cls.make_stage(name=_name("inf"), model=f"{_name('m')}.pkl", **cfg)
    inf.inform(dc2.train if train is None else train)
    return inf


def _estimate(method, model, data, **kw):
    est = METHODS[method][1].make_stage(name=_name("est"), model=model, hdf5_groupname="", output_mode="return",
                                        **kw)
    return est.estimate(data).data


def _pdf_arrays(ens):
    arrays = {k: np.asarray(v) for k, v in ens.objdata.items()}
    arrays.update({k: np.asarray(ens.ancil[k]) for k in ("zmode", "zmean", "zmedian")})
    return arrays


def _assert_identical(a, b, rows=slice(None)):
    for key in a:
        np.testing.assert_array_equal(a[key][rows], b[key][rows], err_msg=key)


def _with_bad(data, bands, rows, value):
    out = {k: np.array(v, copy=True) for k, v in data.items()}
    for b in bands:
        out[b][rows] = value
    return out


# the middle band r enters two colours; u the first one
MASKED_ROWS = np.arange(0, 12)


@pytest.mark.parametrize("method", ["nnc", "lstm", "embed", "cnn"])
def test_mask_hides_the_masked_value_and_the_stored_limit(method, dc2):
    """With mask, neither the raw bad value (99, -99, NaN, -1e30) nor the band's stored limit
    can change the estimate of a masked row."""
    inf = _inform(method, dc2, missing_policy="mask")
    bands = [dc2.bands[0], dc2.bands[2]]
    ref = _pdf_arrays(_estimate(method, inf.model, _with_bad(dc2.test, bands, MASKED_ROWS, 99.0)))
    for value in (-99.0, np.nan, -1e30):
        out = _pdf_arrays(_estimate(method, inf.model, _with_bad(dc2.test, bands, MASKED_ROWS, value)))
        _assert_identical(ref, out)
    model = copy.deepcopy(inf.model)
    for b in bands:
        model["photometry"]["mag_limits"][b] -= 0.7
    out = _pdf_arrays(_estimate(method, model, _with_bad(dc2.test, bands, MASKED_ROWS, 99.0)))
    _assert_identical(ref, out, MASKED_ROWS)
    # ... whereas with 'limit' the limit is what the network sees
    if method == "nnc":
        inf = _inform(method, dc2, missing_policy="limit")
        data = _with_bad(dc2.test, bands, MASKED_ROWS, 99.0)
        ref = _pdf_arrays(_estimate(method, inf.model, data))
        model = copy.deepcopy(inf.model)
        for b in bands:
            model["photometry"]["mag_limits"][b] -= 0.7
        out = _pdf_arrays(_estimate(method, model, data))
        assert not np.array_equal(ref["pdfs"][MASKED_ROWS], out["pdfs"][MASKED_ROWS])


@pytest.mark.parametrize("method", ["nnc", "lstm"])
def test_training_sentinels_cleaned_like_99(method, dc2):
    """-99 and -1e30 in the training table are bad values, cleaned exactly like 99: the same
    model, finite PDFs (the LSTM used to turn -99 into infinite fluxes)."""
    rows = np.arange(0, 40)
    band = dc2.bands[1]
    infs = [_inform(method, dc2, train=_with_bad(dc2.train, [band], rows, v), epochs=1, missing_policy="limit")
            for v in (99.0, -99.0, -1e30)]
    for inf in infs[1:]:
        for key, tensor in infs[0].model["state_dict"].items():
            np.testing.assert_array_equal(tensor.numpy(), inf.model["state_dict"][key].numpy(), err_msg=key)
    pz = _estimate(method, infs[1].model, _with_bad(dc2.test, [band], MASKED_ROWS, -99.0))
    assert all(np.isfinite(v).all() for v in _pdf_arrays(pz).values())


def test_foundation_encoder_on_photometry_refuses_mask(dc2):
    with pytest.raises(ValueError, match="missing_policy='mask' cannot hide"):
        _inform("embed", dc2, encoder="foundation", foundation_path="absent.pt", missing_policy="mask")


# ----------------------------------------------------------------- grid, empty tables, tiny splits


@pytest.fixture(scope="module")
def nnc_model(dc2):
    return _inform("nnc", dc2).model


def test_estimator_grid_must_be_the_models(nnc_model, dc2):
    pz = _estimate("nnc", nnc_model, dc2.test, zmin=0.0, zmax=3.0)  # the model's grid: fine
    assert pz.npdf == len(dc2.test["redshift"])
    with pytest.raises(ValueError, match=r"'zmax'=2\.0 differs from the model's zmax=3\.0"):
        _estimate("nnc", nnc_model, dc2.test, zmax=2.0)


def test_models_without_the_new_photometry_keys_still_read(nnc_model, dc2):
    """Models written before valid_mag_range / mask_features: default range, unmasked features."""
    old = copy.deepcopy(nnc_model)
    del old["photometry"]["valid_mag_range"], old["arch"]["mask_features"]
    _assert_identical(_pdf_arrays(_estimate("nnc", nnc_model, dc2.test)), _pdf_arrays(_estimate("nnc", old, dc2.test)))


def test_empty_training_table_is_an_error(dc2):
    empty = {k: np.asarray(v)[:0] for k, v in dc2.train.items()}
    with pytest.raises(ValueError, match="0 usable rows"):
        _inform("nnc", dc2, train=empty)


def test_split_without_an_optimiser_step_is_an_error(dc2):
    three = {k: np.asarray(v)[:3] for k, v in dc2.train.items()}
    with pytest.raises(ValueError, match="no optimiser step"):
        _inform("nnc", dc2, train=three, val_fraction=0.5)


def test_empty_input_gives_an_empty_valid_ensemble(nnc_model, dc2, tmp_path):
    empty = {k: np.asarray(v)[:0] for k, v in dc2.test.items()}
    assert _estimate("nnc", nnc_model, empty).npdf == 0
    tables_io.write({"photometry": empty}, str(tmp_path / "empty.hdf5"))
    out = tmp_path / "pz.hdf5"
    est = DeepzNNCEstimator.make_stage(name=_name("est"), model=nnc_model, hdf5_groupname="photometry",
                                       output=str(out))
    est.estimate(TableHandle("input", path=str(tmp_path / "empty.hdf5")))
    ens = qp.read(str(out))
    assert ens.npdf == 0 and "zmode" in ens.ancil
