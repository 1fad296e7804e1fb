"""Tests of the LSTM mixture density network (deepz_lstm) and the band-sequence builder."""

import numpy as np
import pytest
import torch

from rail.deepz.datasets import load_dc2
from rail.deepz.mixtures import gmm_crps_numpy
from rail.deepz.photometry import BadPhotometryError, Photometry, extract_photometry
from rail.deepz.sequences import BandSequencer, band_order
from rail.deepz.stages import ModelFormatError
from rail.deepz.nets.lstm import LSTMMDN
from rail.estimation.algos.deepz_lstm import DeepzLSTMEstimator, DeepzLSTMInformer

DC2_WAVELENGTHS = [3671.0, 4827.0, 6223.0, 7546.0, 8691.0, 9712.0]
QUICK = dict(lstm_units=[32], dense_units=[32], n_components=5, epochs=40, batch_size=128, patience=10, lr=3e-3,
             lr_step=25, progress=False, hdf5_groupname="", seed=5, wavelengths=DC2_WAVELENGTHS)
_counter = iter(range(10**6))


def _name(prefix):
    return f"lstm_{prefix}_{next(_counter)}"


@pytest.fixture(scope="module")
def dc2():
    return load_dc2(n_train=3000, n_test=2000, seed=21)


@pytest.fixture(scope="module")
def trained(dc2, tmp_path_factory):
    path = tmp_path_factory.mktemp("lstm") / "lstm_model.pkl"
    inf = DeepzLSTMInformer.make_stage(name=_name("inf"), model=str(path), **QUICK)
    inf.inform(dc2.train)
    return inf, path


def _estimate(model, data, **kw):
    kw.setdefault("hdf5_groupname", "")
    kw.setdefault("output_mode", "return")
    est = DeepzLSTMEstimator.make_stage(name=_name("est"), model=model, **kw)
    return est.estimate(data).data


def _nmad(zp, z):
    return 1.4826 * np.median(np.abs((zp - z) / (1 + z)))


def _mixture(ens):
    d = ens.objdata
    return d["weights"], d["means"], d["stds"]


# ----------------------------------------------------------------- sequences


def test_band_order_and_errors():
    assert list(band_order(["a", "b", "c"])) == [0, 1, 2]
    assert list(band_order(["k", "u", "r"], [21500.0, 3600.0, 6200.0])) == [1, 2, 0]
    with pytest.raises(ValueError, match="wavelengths"):
        band_order(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="positive"):
        band_order(["a", "b"], [1.0, -2.0])


def _phot(mags, errs):
    mags = np.asarray(mags, dtype=np.float64)
    errs = np.asarray(errs, dtype=np.float64)
    data = {f"m{j}": mags[:, j] for j in range(mags.shape[1])}
    data.update({f"e{j}": errs[:, j] for j in range(mags.shape[1])})
    bands = [f"m{j}" for j in range(mags.shape[1])]
    return extract_photometry(data, bands, [f"e{j}" for j in range(mags.shape[1])],
                              mag_limits={b: 28.0 for b in bands}, missing_policy="mask")


@pytest.mark.parametrize("transform", ["asinh", "linear"])
def test_sequencer_order_scaling_and_masking(transform):
    rng = np.random.default_rng(0)
    n = 500
    mags = np.column_stack([rng.normal(24, 1, n), rng.normal(22, 1, n), rng.normal(20, 1, n)])
    errs = np.full_like(mags, 0.05)
    mags[:10, 0] = 99.0  # non-detections
    mags[10:20, 1] = np.nan  # missing
    phot = _phot(mags, errs)
    # bands given as (m0, m1, m2) with wavelengths making the order m2, m0, m1
    seq = BandSequencer(band_order(phot.bands, [5000.0, 9000.0, 3000.0]), transform).fit(phot)
    x = seq.transform(phot)
    assert x.shape == (n, 3, 3) and x.dtype == np.float32 and np.all(np.isfinite(x))
    # step 0 is band m2 (brightest), step 1 is m0, step 2 is m1
    assert np.all(x[:, 0, 2] == 1) and np.all(x[:10, 1, 2] == 0) and np.all(x[10:20, 2, 2] == 0)
    # masked steps are zeroed; valid entries standardised per band (mean 0, std 1)
    assert np.all(x[:10, 1, :2] == 0)
    for t in range(3):
        v = x[:, t, 2] == 1
        assert abs(x[v, t, 0].mean()) < 1e-3 and abs(x[v, t, 0].std() - 1) < 1e-2
    # brighter objects get larger scaled fluxes in every band
    from scipy.stats import spearmanr

    assert spearmanr(x[20:, 0, 0], -mags[20:, 2]).statistic > 0.999
    # round trip through the model dict
    x2 = BandSequencer.from_dict(seq.to_dict()).transform(phot)
    np.testing.assert_array_equal(x, x2)


def test_sequencer_refuses_other_band_count():
    phot = _phot(np.full((5, 3), 22.0), np.full((5, 3), 0.1))
    seq = BandSequencer([0, 1, 2]).fit(phot)
    other = Photometry(bands=["a", "b"], mags=phot.mags[:, :2], errs=phot.errs[:, :2], valid=phot.valid[:, :2])
    with pytest.raises(ValueError, match="3 bands"):
        seq.transform(other)


# ----------------------------------------------------------------- stages


def test_unknown_config_key_and_bad_options(dc2):
    with pytest.raises(ValueError, match="lstm_unit"):
        DeepzLSTMInformer.make_stage(name=_name("bad"), lstm_unit=[8], **QUICK)
    # refused when the stage is made, before any data is read
    for key, value in (("aggregation", "max"), ("wavelengths", [1.0, 2.0]), ("aux_loss_weight", -0.5)):
        with pytest.raises(ValueError, match=key):
            DeepzLSTMInformer.make_stage(name=_name("bad"), **{**QUICK, key: value})


def test_aux_loss_is_what_training_minimises(dc2):
    """loss='crps' + aux_loss_weight w: the stored best validation loss is mean(CRPS + w NLL)
    of the restored network on the validation split."""
    from rail.deepz.mixtures import gmm_crps, gmm_nll
    from rail.deepz.training import split_indices

    sub = {k: v[:1500] for k, v in dc2.train.items()}
    cfg = {**QUICK, "epochs": 3, "patience": 3, "loss": "crps", "aux_loss_weight": 0.5, "band_dropout": 0.0}
    inf = DeepzLSTMInformer.make_stage(name=_name("aux"), **cfg)
    inf.inform(sub)
    m = inf.model
    net = LSTMMDN(**m["arch"])
    net.load_state_dict(m["state_dict"])
    net.eval()
    phot = inf._photometry(sub)
    x = BandSequencer.from_dict(m["scalers"]["sequence"]).transform(phot, phot.valid)
    _, va = split_indices(len(sub["redshift"]), inf.config.val_fraction, inf.config.seed)
    with torch.no_grad():
        out = net(torch.as_tensor(x[va]))
        zv = torch.as_tensor(sub["redshift"][va], dtype=torch.float32)
        crps, nll = gmm_crps(out, zv).mean(), gmm_nll(out, zv).mean()
    assert m["train"]["best_val_loss"] == pytest.approx(float(crps + 0.5 * nll), rel=1e-4)
    assert abs(float(nll)) * 0.5 > 1e-3 * abs(float(crps))  # the NLL term is not negligible


def test_trained_model_beats_trivial_baseline(trained, dc2):
    inf, _ = trained
    m = inf.model
    assert m["method"] == "lstm" and m["bands"] == dc2.bands
    assert m["photometry"]["missing_policy"] == "mask"
    assert 0.3 <= m["sigma_scale"] <= 3.0
    ens = _estimate(inf.get_handle("model"), dc2.test)
    z = dc2.test["redshift"]
    assert ens.npdf == len(z)
    baseline = _nmad(np.full_like(z, np.median(dc2.train["redshift"])), z)
    for key in ("zmean", "zmode", "zmedian"):
        assert np.all(np.isfinite(ens.ancil[key])) and np.all(ens.ancil[key] >= 0)
        assert _nmad(ens.ancil[key], z) < 0.5 * baseline
    # mixture normalised; mass below zmin reported, not hidden
    w, mu, s = _mixture(ens)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
    assert np.all(s > 0) and np.all((ens.ancil["p_outside"] >= 0) & (ens.ancil["p_outside"] <= 1))
    # exact: qp's mixture CDF (scipy) gives the mass inside [zmin, zmax]; with the reported
    # p_outside it adds up to the weight sum (float32 softmax: 1 within ~1e-6), whatever the
    # machine's rounding (a trapezoid rule on a finite grid cannot see mass below its start)
    inside = np.ravel(ens.cdf(m["zmax"]) - ens.cdf(m["zmin"]))
    np.testing.assert_allclose(inside + ens.ancil["p_outside"], 1.0, atol=1e-5)


def test_auto_batch_and_explicit_batch_give_the_same_pdfs(trained, dc2):
    """0 = automatic: 2048 on CPU for the LSTM (its oneDNN buffers stay below the mmap threshold)."""
    inf, path = trained
    sub = {k: v[:3000] for k, v in dc2.test.items()}
    est = DeepzLSTMEstimator.make_stage(name=_name("est"), model=str(path), device="cpu", hdf5_groupname="")
    est.open_model(**est.config)
    assert est.inference_batch_size == 2048
    ref = _estimate(str(path), sub, device="cpu")
    other = _estimate(str(path), sub, device="cpu", inference_batch_size=4096)
    for a, b in zip(_mixture(ref), _mixture(other)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_interp_representation_truncates(trained, dc2):
    inf, _ = trained
    sub = {k: v[:300] for k, v in dc2.test.items()}
    ens = _estimate(inf.get_handle("model"), sub, qp_representation="interp", nzbins=301)
    # the stored PDF is piecewise linear between its nodes, so the trapezoid rule on them is its
    # exact integral (float32 values: 1 within ~1e-6)
    x = np.ravel(ens.metadata["xvals"])
    assert x[0] == 0.0 and x[-1] == 3.0
    np.testing.assert_allclose(np.trapezoid(ens.objdata["yvals"], x, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="qp_representation"):
        DeepzLSTMEstimator.make_stage(name=_name("est"), model=inf.get_handle("model"), qp_representation="hist")


def test_missing_bands_at_estimate_time(trained, dc2):
    """99 / NaN / beyond-limit bands: PDFs stay finite and normalised and get broader."""
    inf, _ = trained
    z = dc2.test["redshift"]
    full = _estimate(inf.get_handle("model"), dc2.test)
    w, mu, s = _mixture(full)
    crps_full = gmm_crps_numpy(w, mu, s, z).mean()
    prev_std = np.median(full.ancil["zstd"])
    removed = {}
    for drop, val in ((["mag_u_lsst"], 99.0), (["mag_u_lsst", "mag_y_lsst"], np.nan),
                      (["mag_u_lsst", "mag_y_lsst", "mag_g_lsst", "mag_z_lsst"], np.inf)):
        data = dict(dc2.test)
        for b in drop:
            data[b] = np.full_like(data[b], val)
        ens = _estimate(inf.get_handle("model"), data)
        w, mu, s = _mixture(ens)
        assert np.all(np.isfinite(w)) and np.all(np.isfinite(mu)) and np.all(np.isfinite(s))
        np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
        assert np.all(np.isfinite(ens.ancil["zmean"]))
        removed[len(drop)] = (np.median(ens.ancil["zstd"]), gmm_crps_numpy(w, mu, s, z).mean())
    # fewer bands: broader PDFs, worse CRPS, monotonically, but still far better than no data
    stds = [prev_std] + [removed[k][0] for k in (1, 2, 4)]
    crps = [crps_full] + [removed[k][1] for k in (1, 2, 4)]
    assert all(b >= a * 0.98 for a, b in zip(stds, stds[1:])) and stds[-1] > 1.3 * stds[0]
    assert all(b >= a * 0.98 for a, b in zip(crps, crps[1:])) and crps[-1] > crps[0]
    # one object with every band missing still gets a finite, normalised PDF
    one = {k: np.asarray(v[:3]).copy() for k, v in dc2.test.items()}
    for b in dc2.bands:
        one[b][:] = 99.0
    ens = _estimate(inf.get_handle("model"), one)
    np.testing.assert_allclose(_mixture(ens)[0].sum(1), 1.0, atol=1e-5)
    assert np.all(np.isfinite(ens.ancil["zmedian"]))


def test_seed_determinism(dc2):
    sub = {k: v[:800] for k, v in dc2.train.items()}
    cfg = {**QUICK, "epochs": 3}
    states = []
    for _ in range(2):
        inf = DeepzLSTMInformer.make_stage(name=_name("det"), **cfg)
        inf.inform(sub)
        states.append(inf.model["state_dict"])
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    inf = DeepzLSTMInformer.make_stage(name=_name("det"), **{**cfg, "seed": 6})
    inf.inform(sub)
    assert not torch.equal(states[0]["head.mu.weight"], inf.model["state_dict"]["head.mu.weight"])


def test_save_load_through_model_file(trained, dc2):
    inf, path = trained
    assert path.exists()
    sub = {k: v[:500] for k, v in dc2.test.items()}
    a = _estimate(inf.get_handle("model"), sub)
    b = _estimate(str(path), sub)  # a new stage reading the model file
    np.testing.assert_allclose(_mixture(a)[1], _mixture(b)[1], rtol=1e-6)
    np.testing.assert_allclose(a.ancil["zmean"], b.ancil["zmean"], rtol=1e-6)


def test_refuses_other_bands(trained, dc2):
    inf, path = trained
    with pytest.raises(BadPhotometryError, match="trained on bands"):
        _estimate(str(path), dc2.test, bands=dc2.bands[:5], err_bands=dc2.err_bands[:5])
    data = {k: v for k, v in dc2.test.items() if k != "mag_y_lsst"}
    with pytest.raises(BadPhotometryError, match="mag_y_lsst"):
        _estimate(str(path), data)


def test_refuses_other_method(tmp_path, dc2):
    from rail.deepz.modelfile import load_model
    from rail.estimation.algos.deepz_nnc import DeepzNNCInformer

    path = tmp_path / "nnc.pkl"
    inf = DeepzNNCInformer.make_stage(name=_name("nnc"), model=str(path), hidden_layers=[8], nbins=20, epochs=1,
                                      progress=False, hdf5_groupname="", temperature_scaling=False)
    inf.inform({k: v[:300] for k, v in dc2.train.items()})
    assert load_model(path)["method"] == "nnc"
    with pytest.raises(ModelFormatError, match="'nnc' model"):
        _estimate(str(path), {k: v[:10] for k, v in dc2.test.items()})


@pytest.mark.parametrize("aggregation", ["last", "mean", "attention", "flatten"])
@pytest.mark.parametrize("bidirectional,dense", [(True, [16]), (False, [16]), (True, [])])
def test_fold_batch_norms_keeps_outputs(aggregation, bidirectional, dense):
    torch.manual_seed(0)
    net = LSTMMDN(5, [12, 8, 6], bidirectional=bidirectional, aggregation=aggregation, dense_units=dense,
                  n_components=4, dropout=0.2)
    for norm in net.norms:  # non-trivial statistics and affine parameters
        with torch.no_grad():
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.2, 3)
            norm.weight.uniform_(0.5, 2)
            norm.bias.uniform_(-1, 1)
    net.eval()
    x = torch.randn(300, 5, 3)
    x[..., 2] = (torch.rand(300, 5) > 0.2).float()
    with torch.no_grad():
        ref = net(x)
        out = net.fold_batch_norms()(x)
    n_left = sum(isinstance(m, torch.nn.BatchNorm1d) for m in net.norms)
    assert n_left == (1 if aggregation == "attention" else 0)
    for key in ("weights", "means", "sigmas"):
        torch.testing.assert_close(getattr(out, key), getattr(ref, key), rtol=1e-4, atol=1e-5)
