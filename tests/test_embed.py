"""Tests of the embedding MDN, its encoders, the SOM flags and the stand-alone flagger."""

import io

import numpy as np
import pytest
import qp
import torch
from rail.core.data import TableHandle

from rail.deepz.datasets import load_dc2
from rail.deepz.encoders import (
    AutoencoderEncoder,
    ColumnsEncoder,
    EncoderError,
    FoundationModelEncoder,
    encoder_from_dict,
)
from rail.deepz.mixtures import MixtureParams, fixed_grid_crps, fixed_grid_pair_matrix, gmm_crps
from rail.deepz.modelfile import decode, encode
from rail.deepz.photometry import extract_photometry
from rail.deepz.som import SOMFlagModel, cell_statistics, grouped_median
from rail.deepz.pdf import (
    RepeatedRows,
    ensemble_pit,
    ensemble_point_and_pit,
    ensemble_point_estimate,
    fixed_grid_ensemble,
    fixed_grid_summaries,
)
from rail.deepz.nets.embed import EmbedMDN
from rail.estimation.algos.deepz_embed import DeepzEmbedEstimator, DeepzEmbedInformer
from rail.estimation.algos.deepz_somflag import DeepzSOMFlagger, DeepzSOMFlagInformer

QUICK = dict(hdf5_groupname="", epochs=25, ae_epochs=15, hidden_layers=[64, 64, 64], ae_hidden=[32],
             som_shape=[6, 6], som_iterations=4000, som_n_boot=30, progress=False, seed=3)
_counter = iter(range(10**6))


def _name(prefix):
    return f"{prefix}_embed_{next(_counter)}"


@pytest.fixture(scope="module")
def dc2():
    return load_dc2(n_train=3000, n_test=2000, seed=21)


@pytest.fixture(scope="module")
def trained(dc2, tmp_path_factory):
    path = tmp_path_factory.mktemp("embed") / "embed_model.pkl"
    inf = DeepzEmbedInformer.make_stage(name=_name("inf"), model=str(path), **QUICK)
    inf.inform(dc2.train)
    return inf, path


def _estimate(model, data, **kw):
    kw.setdefault("hdf5_groupname", "")
    kw.setdefault("output_mode", "return")
    est = DeepzEmbedEstimator.make_stage(name=_name("est"), model=model, **kw)
    return est.estimate(data).data


def _nmad(zp, z):
    return 1.4826 * np.median(np.abs((zp - z) / (1 + z)))


def _rows(table, start, stop, seed=0):
    """Rows start:stop of a seeded permutation (the DC2 tables are sorted by redshift)."""
    n = len(next(iter(table.values())))
    idx = np.sort(np.random.default_rng(seed).permutation(n)[start:stop])
    return {k: np.asarray(v)[idx] for k, v in table.items()}


def _phot(ds, table):
    return extract_photometry(table, ds.bands, ds.err_bands, mag_limits=ds.mag_limits)


# ------------------------------------------------------------------ losses and PDFs


def test_fixed_grid_crps_matches_closed_form():
    torch.manual_seed(0)
    c = torch.linspace(0.0, 3.0, 200, dtype=torch.float64)
    w = torch.softmax(3 * torch.randn(64, 200, dtype=torch.float64), -1)
    z = 3 * torch.rand(64, dtype=torch.float64)
    ref = gmm_crps(MixtureParams(w, c.expand(64, 200), torch.full((64, 200), 0.0037, dtype=torch.float64)), z)
    fast = fixed_grid_crps(w, z, c, 0.0037, fixed_grid_pair_matrix(c, 0.0037))
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    # a sharp mixture at the truth scores far better than one elsewhere
    w1 = torch.zeros(1, 200, dtype=torch.float64)
    w1[0, 100] = 1.0
    good = fixed_grid_crps(w1, c[100:101], c, 0.0037)
    bad = fixed_grid_crps(w1, c[10:11], c, 0.0037)
    assert float(good) < 0.01 < float(bad)


def test_fixed_grid_ensemble_ancil_is_exact():
    rng = np.random.default_rng(1)
    c = np.linspace(0, 3, 200)
    w = rng.dirichlet(np.full(200, 0.05), size=20)
    ens = fixed_grid_ensemble(w, c, 0.0037, 0.0, 3.0)
    assert ens.gen_class.name == "mixmod"
    # exact normalisation: mass inside [0, 3] by qp's mixture CDF + reported p_outside = 1
    np.testing.assert_allclose(np.ravel(ens.cdf(3.0) - ens.cdf(0.0)) + ens.ancil["p_outside"], 1.0, atol=1e-5)
    inside = ens.ancil["p_outside"] < 1e-6
    np.testing.assert_allclose(ens.ancil["zmean"][inside], (w * c).sum(1)[inside], atol=2e-3)
    x = np.linspace(0, 3, 3001)
    np.testing.assert_allclose(ens.ancil["zmode"], x[np.argmax(ens.pdf(x), axis=1)], atol=5e-3)


def test_repeated_rows_are_shared_read_only_views():
    rows = RepeatedRows()
    c = np.linspace(0, 3, 200)
    a = rows(c, 1000)
    assert a.shape == (1000, 200) and a.dtype == np.float32 and not a.flags.writeable
    np.testing.assert_array_equal(a, np.broadcast_to(c.astype(np.float32), (1000, 200)))
    b = rows(c, 10)  # a shorter chunk: a view of the same memory, no new array
    assert b.shape == (10, 200) and np.shares_memory(a, b)
    big = rows(c, 3000)  # a longer chunk grows the kept array
    assert big.shape == (3000, 200) and np.all(big == big[0])
    other = rows(np.full(200, 0.0037), 10)  # another row has its own array
    assert not np.shares_memory(other, big) and np.all(other == np.float32(0.0037))
    with pytest.raises(ValueError, match="read-only"):
        a[0, 0] = 1.0


def test_fixed_grid_ensemble_with_shared_rows_is_unchanged():
    rng = np.random.default_rng(2)
    c = np.linspace(0, 3, 200)
    w = rng.dirichlet(np.full(200, 0.05), size=50).astype(np.float32)
    rows = RepeatedRows()
    fixed_grid_ensemble(w[:40], c, 0.0037, 0.0, 3.0, rows=rows)  # a previous, larger chunk
    ens = fixed_grid_ensemble(w[:30], c, 0.0037, 0.0, 3.0, rows=rows)
    ref = fixed_grid_ensemble(w[:30], c, 0.0037, 0.0, 3.0)
    for key in ("weights", "means", "stds"):
        np.testing.assert_array_equal(ens.objdata[key], ref.objdata[key])
    x = np.linspace(0, 3, 301)
    np.testing.assert_array_equal(ens.pdf(x), ref.pdf(x))
    # the summaries do not depend on the block size
    small = fixed_grid_summaries(w, c, 0.0037, 0.0, 3.0, block=7)
    full = fixed_grid_summaries(w, c, 0.0037, 0.0, 3.0, block=4096)
    for key in full:
        np.testing.assert_allclose(small[key], full[key], rtol=1e-6, atol=1e-7)


def test_fixed_grid_centres_have_one_source():
    """The head's means, the loss's and the output's are the same evenly spaced points."""
    from rail.deepz.mixtures import FixedGridMixtureHead, fixed_grid_centers

    head = FixedGridMixtureHead(4, 0.0, 3.0, 200, 0.0037)
    c = fixed_grid_centers(0.0, 3.0, 200)
    assert c[0] == 0.0 and c[-1] == 3.0 and np.allclose(np.diff(c), 3.0 / 199)
    np.testing.assert_array_equal(head.centers.numpy(), c.astype(np.float32))
    net = EmbedMDN(5, [8], 0.0, 3.0, 200, 0.0037)
    x = torch.randn(7, 5)
    # the network's output is its head's weights
    np.testing.assert_array_equal(net(x).detach().numpy(), net.head(net.body(x)).weights.detach().numpy())


def test_ensemble_point_and_pit_match_qp():
    """The helper for any qp ensemble: ancil point estimate if present, else from the PDF;
    PIT equal to qp's PIT samples, also when read in chunks."""
    from qp.metrics.pit import PIT

    rng = np.random.default_rng(5)
    n = 60
    means = rng.uniform(0.2, 2.5, (n, 2))
    ens = qp.Ensemble(qp.mixmod, data=dict(weights=np.full((n, 2), 0.5), means=means, stds=np.full((n, 2), 0.05)))
    z = rng.uniform(0.0, 3.0, n)
    zmode, pit = ensemble_point_and_pit(ens, z, "zmode", 0.0, 3.0, chunk=17)
    np.testing.assert_allclose(pit, PIT._gather_pit_samples(ens, z), atol=1e-12)
    grid = np.linspace(0.0, 3.0, 1201)
    np.testing.assert_allclose(zmode, grid[np.argmax(ens.pdf(grid), axis=1)])
    gauss = qp.Ensemble(qp.stats.norm, data=dict(loc=means[:, :1], scale=np.full((n, 1), 0.1)))
    np.testing.assert_allclose(ensemble_point_estimate(gauss, "zmean", grid), means[:, 0], atol=1e-9)
    np.testing.assert_allclose(ensemble_point_estimate(gauss, "zmedian", grid), means[:, 0], atol=1e-9)
    ens.set_ancil(dict(zmode=np.full(n, 1.5)))
    assert np.all(ensemble_point_and_pit(ens, z, "zmode", 0.0, 3.0)[0] == 1.5)
    with pytest.raises(KeyError, match="z_q50"):
        ensemble_point_estimate(ens, "z_q50", grid)
    with pytest.raises(ValueError, match="60 PDFs"):
        ensemble_pit(ens, z[:10])


# ------------------------------------------------------------------ encoders


def test_columns_encoder_validates_columns():
    n = 10
    data = {"e0": np.arange(n, dtype=float), "e1": np.ones(n), "emb2d": np.ones((n, 4)), "txt": np.array(["a"] * n)}
    assert ColumnsEncoder(["e0", "e1"]).fit(data, None, np.arange(8), np.arange(8, 10)).encode(data, None).shape == (n, 2)
    enc = ColumnsEncoder(["emb2d"]).fit(data, None, np.arange(8), np.arange(8, 10))
    assert enc.out_dim == 4 and encoder_from_dict(enc.to_dict()).encode(data, None).dtype == np.float32
    with pytest.raises(EncoderError, match="'missing_col'"):
        ColumnsEncoder(["e0", "missing_col"]).encode(data, None)
    with pytest.raises(EncoderError, match="'txt'.*numeric"):
        ColumnsEncoder(["txt"]).encode(data, None)
    bad = dict(data, e1=np.where(np.arange(n) == 3, np.nan, 1.0))
    with pytest.raises(EncoderError, match="'e1' has NaN/inf values in 1 row"):
        ColumnsEncoder(["e0", "e1"]).encode(bad, None)
    with pytest.raises(EncoderError, match="dimension 3.*trained on dimension 4"):
        enc.encode(dict(data, emb2d=np.ones((n, 3))), None)
    with pytest.raises(EncoderError, match="'emb2d' must be 1-D"):
        ColumnsEncoder(["e0", "emb2d"]).encode(data, None)


def test_foundation_encoder_never_downloads_and_explains(tmp_path):
    with pytest.raises(EncoderError, match="foundation_path' is empty"):
        FoundationModelEncoder("").encode({"a": np.ones(2)}, None)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        FoundationModelEncoder(str(tmp_path / "aion-small.pt")).encode({"a": np.ones(2)}, None)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(EncoderError, match="not a TorchScript file"):
        FoundationModelEncoder(str(junk)).encode({"a": np.ones(2)}, None)
    with pytest.raises(EncoderError, match="module:function"):
        FoundationModelEncoder(str(junk), fmt="loader", loader="nocolon").encode({"a": np.ones(2)}, None)
    with pytest.raises(EncoderError, match="foundation_format"):
        FoundationModelEncoder(str(junk), fmt="onnx")


def _torchscript_model(path, n_in, n_out=8):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(n_in, 16), torch.nn.Tanh(), torch.nn.Linear(16, n_out))
    torch.jit.script(net).save(str(path))


def test_foundation_torchscript_end_to_end(dc2, tmp_path):
    path = tmp_path / "tiny_fm.pt"
    _torchscript_model(path, 11)  # mags (6) + colours (5)
    train = _rows(dc2.train, 0, 1200)
    cfg = dict(QUICK, encoder="foundation", foundation_path=str(path), epochs=3, som_shape=[4, 4], som_iterations=500)
    inf = DeepzEmbedInformer.make_stage(name=_name("inf"), **cfg)
    inf.inform(train)
    assert inf.model["encoder"]["kind"] == "foundation" and inf.model["encoder"]["out_dim"] == 8
    test = _rows(dc2.test, 0, 300)
    ens = _estimate(inf.get_handle("model"), test)
    assert ens.npdf == 300 and np.all(np.isfinite(ens.ancil["zmode"]))
    torch.jit.script(torch.nn.Linear(11, 8)).save(str(path))  # other weights at the same path
    with pytest.raises(EncoderError, match="SHA-256"):
        _estimate(inf.model, test)


def test_autoencoder_with_images(dc2):
    rng = np.random.default_rng(0)
    n = 400
    data = _rows(dc2.train, 0, n)
    data["cutout"] = rng.normal(size=(n, 2, 16, 16)).astype(np.float32) + data["redshift"][:, None, None, None]
    phot = _phot(dc2, data)
    enc = AutoencoderEncoder(["colors"], [16], 4, image_column="cutout", image_latent_dim=3, epochs=2, batch_size=128)
    enc.fit(data, phot, np.arange(300), np.arange(300, n))
    emb = enc.encode(data, phot)
    assert emb.shape == (n, 7) and np.all(np.isfinite(emb))
    again = encoder_from_dict(enc.to_dict()).encode(data, phot)
    np.testing.assert_allclose(again, emb, rtol=1e-5, atol=1e-6)
    with pytest.raises(EncoderError, match=r"'cutout'.*\(2, 8, 8\).*\(2, 16, 16\)"):
        enc.encode(dict(data, cutout=data["cutout"][:, :, :8, :8]), phot)


# ------------------------------------------------------------------ SOM statistics


def test_cell_statistics_hand_computed():
    # cell 0: residuals dz = 0, 0.1, 0.2 (z = 0 -> dz = zphot); cell 2: dz = -0.3, 0.01; cell 1 empty
    cells = np.array([0, 0, 0, 2, 2])
    ztrue = np.zeros(5)
    zphot = np.array([0.0, 0.1, 0.2, -0.3, 0.01])
    pit = np.array([0.5, 0.999, 0.5, 0.001, 0.3])
    st = cell_statistics(cells, 3, zphot, ztrue, pit, n_boot=200, seed=0)
    np.testing.assert_array_equal(st["val_count"], [3, 0, 2])
    np.testing.assert_allclose(st["sigma_nmad"], [1.4826 * 0.1, np.nan, 1.4826 * 0.155], equal_nan=True)
    np.testing.assert_allclose(st["bias"], [0.1, np.nan, -0.145], equal_nan=True)
    np.testing.assert_allclose(st["eta"], [1 / 3, np.nan, 0.5], equal_nan=True)
    np.testing.assert_allclose(st["pco"], [1 / 3, np.nan, 0.5], equal_nan=True)
    assert st["global"]["eta"] == pytest.approx(0.4) and st["global"]["pco"] == pytest.approx(0.4)
    assert st["global"]["sigma_nmad"] == pytest.approx(1.4826 * 0.1)
    assert st["eta_err"][0] > 0 and np.isnan(st["eta_err"][1]) and st["eta_null"][2] > 0
    # bootstrap error of a cell's eta ~ binomial sqrt(p (1 - p) / n)
    assert st["eta_err"][2] == pytest.approx(0.5 / np.sqrt(2), rel=0.25)
    np.testing.assert_allclose(grouped_median(np.array([3.0, 1, 2, 10]), np.array([1, 1, 1, 0]), 3),
                               [10.0, 2.0, np.nan], equal_nan=True)


def test_underperforming_cells_are_found():
    """A region of colour space with wrong redshifts is flagged; the rest mostly is not."""
    rng = np.random.default_rng(4)
    x = rng.uniform(-1, 1, size=(6000, 2))
    z = rng.uniform(0.1, 1.0, 6000)
    bad = x[:, 0] > 0.6
    zphot = z + 0.01 * rng.normal(size=6000) * (1 + z)
    zphot[bad] = z[bad] + 0.3  # catastrophic outliers in one corner
    pit = rng.uniform(size=6000)
    pit[bad] = 0.9999
    tr, va = np.arange(3000), np.arange(3000, 6000)
    fm = SOMFlagModel.build(["a", "b"], x[tr], x[tr], x[va], zphot[va], z[va], pit[va], shape=(8, 8), n_iter=5000,
                            seed=1, n_boot=30)
    flags = fm.flag(x[va])
    under = flags["flag_underperforming"]
    assert under[bad[va]].mean() > 0.8
    assert under[~bad[va]].mean() < 0.15
    assert not flags["flag_ood"].any() or flags["flag_ood"].mean() < 0.01
    buf = io.BytesIO()  # the model file format: torch.save, read back with weights_only=True
    torch.save(encode(fm.to_dict()), buf)
    buf.seek(0)
    restored = SOMFlagModel.from_dict(decode(torch.load(buf, weights_only=True)))
    np.testing.assert_array_equal(restored.flag(x[va])["flag_underperforming"], under)


# ------------------------------------------------------------------ the embedding MDN


def test_learns_and_outputs_mixmod_with_flags(trained, dc2):
    inf, path = trained
    assert path.exists() and inf.model["method"] == "embed"
    ens = _estimate(inf.get_handle("model"), dc2.test)
    z = dc2.test["redshift"]
    assert ens.gen_class.name == "mixmod" and ens.npdf == len(z)
    assert ens.objdata["weights"].shape[1] == 200
    # the width follows the spacing: Gaussians 2 sigma apart on [0, 3]
    np.testing.assert_allclose(np.diff(ens.objdata["means"][0]) / ens.objdata["stds"][0, 0], 2.0, rtol=1e-4)  # float32
    baseline = _nmad(np.full_like(z, np.median(dc2.train["redshift"])), z)
    assert _nmad(ens.ancil["zmode"], z) < 0.5 * baseline
    for key in ("zmode", "zmean", "zmedian", "som_cell", "som_train_count", "flag_ood", "flag_underperforming"):
        assert key in ens.ancil and len(ens.ancil[key]) == len(z)
    fm = SOMFlagModel.from_dict(inf.model["som"])
    np.testing.assert_array_equal(ens.ancil["som_train_count"], fm.train_count[ens.ancil["som_cell"]])
    assert ens.ancil["flag_ood"].mean() < 0.05  # same distribution as training


def test_far_outside_training_colours_is_flagged_ood(trained, dc2):
    inf, _ = trained
    rng = np.random.default_rng(2)
    n = 200
    test = _rows(dc2.test, 0, n)
    # colours u-g=4, g-r=-2, r-i=3, i-z=-2, z-y=3: nothing like a galaxy, all detected
    base = {"u": 26.0, "g": 22.0, "r": 24.0, "i": 21.0, "z": 23.0, "y": 20.0}
    for b, m in base.items():
        test[f"mag_{b}_lsst"] = m + rng.uniform(-0.3, 0.3, n)
    ens_far = _estimate(inf.get_handle("model"), test)
    assert ens_far.ancil["flag_ood"].all()
    ens_in = _estimate(inf.get_handle("model"), _rows(dc2.test, 0, n))
    assert ens_in.ancil["flag_ood"].mean() < 0.05
    assert np.median(ens_far.ancil["som_dist"]) > 3 * np.median(ens_in.ancil["som_dist"])


def test_model_file_roundtrip(trained, dc2):
    inf, path = trained
    test = {k: v[:500] for k, v in dc2.test.items()}
    a = _estimate(inf.get_handle("model"), test)
    b = _estimate(str(path), test)
    np.testing.assert_allclose(a.objdata["weights"], b.objdata["weights"], rtol=1e-6)
    np.testing.assert_array_equal(a.ancil["som_cell"], b.ancil["som_cell"])


def test_basis_spacing_follows_the_range():
    """The derived count keeps neighbouring means <= basis_spacing sigma apart, and is the fewest that do."""
    from rail.deepz.mixtures import fixed_grid_size, fixed_grid_spacing

    for zmin, zmax, sigma, ratio in [(0.0, 3.0, 0.0037, 2.0), (0.0, 1.2, 0.0037, 2.0), (2.5, 7.5, 0.0037, 2.0),
                                     (0.0, 1.6, 0.0037, 2.2), (0.0, 4.0, 0.01, 1.5), (0.1, 0.3, 0.002, 1.0)]:
        n = fixed_grid_size(zmin, zmax, sigma, ratio)
        assert fixed_grid_spacing(zmin, zmax, n) <= ratio * sigma * (1 + 1e-12)
        assert fixed_grid_spacing(zmin, zmax, n - 1) > ratio * sigma
    assert fixed_grid_size(0.0, 1.6, 0.0037, 2.2) == 198  # the paper: 200 Gaussians, ~2.2 sigma apart
    assert fixed_grid_size(0.0, 3.0, 0.0075, 2.0) == 201  # an exact ratio does not round up
    for zmin, zmax in [(0.0, 3.0), (0.0, 1.2), (2.5, 7.5)]:
        n, sigma = DeepzEmbedInformer.make_stage(name=_name("inf"), zmin=zmin, zmax=zmax).basis()  # defaults
        assert n == 200 and fixed_grid_spacing(zmin, zmax, n) / sigma == pytest.approx(2.0)
        n, sigma = DeepzEmbedInformer.make_stage(name=_name("inf"), zmin=zmin, zmax=zmax, n_components=0,
                                                 component_sigma=0.0037).basis()
        assert sigma == 0.0037 and fixed_grid_spacing(zmin, zmax, n) / sigma <= 2.0
    assert DeepzEmbedInformer.make_stage(name=_name("inf"), n_components=0, component_sigma=0.0037).basis()[0] == 407
    with pytest.raises(ValueError, match=r"n_components'=200.*4\.0[0-9] x component_sigma=0.0037.*basis_spacing"):
        DeepzEmbedInformer.make_stage(name=_name("inf"), n_components=200, component_sigma=0.0037)
    # a wider spacing on purpose (the old default), or a pair within the ratio, is accepted
    assert DeepzEmbedInformer.make_stage(name=_name("inf"), n_components=200, component_sigma=0.0037,
                                         basis_spacing=5.0).basis() == (200, 0.0037)
    assert DeepzEmbedInformer.make_stage(name=_name("inf"), n_components=200, component_sigma=0.0076).basis() == (
        200, 0.0076)
    for bad, match in ((dict(n_components=1), "n_components"), (dict(basis_spacing=0.0), "basis_spacing"),
                       (dict(component_sigma=-0.01), "component_sigma"),
                       (dict(n_components=0, component_sigma=0.0), "both be 0")):
        with pytest.raises(ValueError, match=match):
            DeepzEmbedInformer.make_stage(name=_name("inf"), **bad)


def test_wide_basis_makes_combs_and_the_tied_basis_does_not():
    """The same smooth redshift profile on the old basis (4.1 sigma apart) is a comb; on the new one, one peak."""
    from rail.deepz.mixtures import fixed_grid_size
    from rail.evaluation.deepz_metrics import local_maxima_count

    grid = np.linspace(0.0, 3.0, 3001)
    rows = []
    for n in (200, fixed_grid_size(0.0, 3.0, 0.0037, 2.0)):
        c = np.linspace(0.0, 3.0, n)
        w = np.exp(-0.5 * ((c[None, :] - np.array([[0.8], [1.7], [1.2]])) / np.array([[0.05], [0.1], [0.5]])) ** 2)
        w /= w.sum(1, keepdims=True)
        ens = fixed_grid_ensemble(w, c, 0.0037, 0.0, 3.0)
        rows.append(local_maxima_count(ens.pdf(grid)))
    assert (rows[0] >= 20).all()  # comb: a peak per Gaussian under the profile
    np.testing.assert_array_equal(rows[1], [1, 1, 1])  # spacing <= 2 sigma: smooth, one peak


def test_old_model_files_keep_their_basis(trained, dc2, tmp_path):
    """A model written with the old 200-Gaussian basis (arch in the file) still loads and gives 200 components."""
    from rail.deepz.modelfile import save_model

    inf, _ = trained
    old = dict(inf.model)
    arch = dict(old["arch"], n_components=200, sigma=0.0037)
    net = EmbedMDN(arch["in_features"], arch["hidden"], old["zmin"], old["zmax"], 200, 0.0037, arch["dropout"])
    old.update(arch=arch, state_dict={k: v.detach().clone() for k, v in net.state_dict().items()})
    path = tmp_path / "old_embed.pkl"
    save_model(old, str(path))
    ens = _estimate(str(path), {k: v[:50] for k, v in dc2.test.items()})
    assert ens.objdata["weights"].shape == (50, 200)
    np.testing.assert_allclose(ens.objdata["means"][0], np.linspace(0.0, 3.0, 200), rtol=1e-6, atol=1e-6)


def test_chunked_file_output_and_bad_inputs(trained, dc2, tmp_path):
    inf, _ = trained
    test = {k: v[:700] for k, v in dc2.test.items()}
    out = tmp_path / "embed_out.hdf5"
    est = DeepzEmbedEstimator.make_stage(name=_name("est"), model=inf.get_handle("model"), hdf5_groupname="",
                                         chunk_size=256, output=str(out))
    est.estimate(TableHandle("input", data=test))
    ens = qp.read(str(out))
    ref = _estimate(inf.get_handle("model"), test)
    np.testing.assert_allclose(ens.ancil["zmode"], ref.ancil["zmode"])
    np.testing.assert_array_equal(ens.ancil["flag_ood"].astype(bool), ref.ancil["flag_ood"])
    with pytest.raises(Exception, match="mag_y_lsst"):
        _estimate(inf.get_handle("model"), {k: v for k, v in test.items() if k != "mag_y_lsst"})


def test_seed_makes_training_deterministic(dc2):
    small = _rows(dc2.train, 0, 600)
    cfg = dict(QUICK, epochs=2, ae_epochs=2, som_shape=[3, 3], som_iterations=300, som_n_boot=5)
    models = []
    for seed in (5, 5, 6):
        inf = DeepzEmbedInformer.make_stage(name=_name("inf"), **dict(cfg, seed=seed))
        inf.inform(small)
        models.append(inf.model)
    sd = [m["state_dict"] for m in models]
    assert all(torch.equal(sd[0][k], sd[1][k]) for k in sd[0])
    assert any(not torch.equal(sd[0][k], sd[2][k]) for k in sd[0])
    np.testing.assert_array_equal(models[0]["som"]["som"]["codebook"], models[1]["som"]["som"]["codebook"])


def test_columns_encoder_stage_and_reference_som(dc2):
    rng = np.random.default_rng(0)
    train = _rows(dc2.train, 0, 1500)
    train["emb"] = np.stack([train["redshift"] + 0.05 * rng.normal(size=1500), rng.normal(size=1500)], 1)
    ref = {k: v for k, v in dc2.test.items()}  # unlabelled reference sample for the SOM
    ref.pop("redshift")
    cfg = dict(QUICK, encoder="columns", embedding_columns=["emb"], epochs=60, som_shape=[5, 5], som_iterations=2000)
    inf = DeepzEmbedInformer.make_stage(name=_name("inf"), **cfg)
    inf.inform(train, reference=ref)
    assert inf.model["som"]["ref_count"].sum() == len(dc2.test["redshift"])
    test = {k: v[:300] for k, v in train.items()}
    ens = _estimate(inf.get_handle("model"), test)
    assert _nmad(ens.ancil["zmode"], test["redshift"]) < 0.12
    with pytest.raises(EncoderError, match="'emb'"):
        _estimate(inf.get_handle("model"), {k: v for k, v in test.items() if k != "emb"})


# ------------------------------------------------------------------ the stand-alone flagger


def _other_estimator(table, seed):
    """A stand-in for FlexZBoost/BPZ output: Gaussian PDFs, poor for u-g > 1 (qp.interp)."""
    rng = np.random.default_rng(seed)
    z = table["redshift"]
    ug = table["mag_u_lsst"] - table["mag_g_lsst"]
    width = np.where(ug > 1.0, 0.3, 0.03) * (1 + z)
    centre = z + width * rng.normal(size=len(z)) + np.where(ug > 1.0, 0.5, 0.0)
    grid = np.linspace(0, 3, 301)
    pdf = np.exp(-0.5 * ((grid[None, :] - centre[:, None]) / width[:, None]) ** 2)
    ens = qp.Ensemble(qp.interp, data=dict(xvals=grid, yvals=pdf))
    ens.set_ancil({"zmode": grid[np.argmax(pdf, axis=1)]})
    return ens


def test_som_side_automatic(dc2):
    """som_shape [] (default): a square grid of ~20 validation objects per cell, side 4..20."""
    from rail.deepz.som_options import auto_som_side

    assert [auto_som_side(n) for n in (0, 320, 1022, 2500, 8000, 10**6)] == [4, 4, 7, 11, 20, 20]
    calib = _rows(dc2.train, 2000, 3000)
    finf = DeepzSOMFlagInformer.make_stage(name=_name("finf"), hdf5_groupname="", som_iterations=300, som_n_boot=5)
    assert finf.config.som_shape == []
    finf.inform(_rows(dc2.train, 0, 2000), calib, _other_estimator(calib, 1))
    assert finf.model["som"]["som"]["shape"] == [7, 7]  # 1,000 validation objects
    with pytest.raises(ValueError, match="'som_shape'.*automatic"):
        DeepzSOMFlagInformer.make_stage(name=_name("finf"), som_shape=[5])
    # the embedding MDN sizes it from its own validation split: 500 of 1,000 rows -> 5x5
    cfg = {k: v for k, v in QUICK.items() if k != "som_shape"}
    inf = DeepzEmbedInformer.make_stage(name=_name("inf"), **dict(cfg, epochs=2, ae_epochs=2, som_iterations=300,
                                                                  som_n_boot=5, val_fraction=0.5))
    inf.inform(_rows(dc2.train, 0, 1000))
    assert inf.model["som"]["som"]["shape"] == [5, 5]


def test_flagger_on_any_ensemble(dc2, tmp_path):
    train = _rows(dc2.train, 0, 2000)
    calib = _rows(dc2.train, 2000, 3000)
    test = _rows(dc2.test, 0, 1500)
    finf = DeepzSOMFlagInformer.make_stage(name=_name("finf"), hdf5_groupname="", som_shape=[6, 6],
                                           som_iterations=3000, som_n_boot=30, som_features=["colors", "mag_i_lsst"])
    finf.inform(train, calib, _other_estimator(calib, 1))
    assert finf.model["method"] == "somflag"
    test_ens = _other_estimator(test, 2)
    zmode_before = test_ens.ancil["zmode"].copy()
    flagger = DeepzSOMFlagger.make_stage(name=_name("flag"), model=finf.get_handle("model"), hdf5_groupname="",
                                         output_mode="return")
    out = flagger.estimate(test, test_ens).data
    assert set(test_ens.ancil) == {"zmode"}  # the caller's ensemble is untouched
    np.testing.assert_array_equal(out.ancil["zmode"], zmode_before)
    np.testing.assert_allclose(out.objdata["yvals"], test_ens.objdata["yvals"])
    under = out.ancil["flag_underperforming"].astype(bool)
    ug = test["mag_u_lsst"] - test["mag_g_lsst"]
    z = test["redshift"]
    assert under[ug > 1.0].mean() > 3 * max(under[ug <= 1.0].mean(), 0.01)
    eta = lambda sel: np.mean(np.abs(zmode_before[sel] - z[sel]) / (1 + z[sel]) > 0.15)  # noqa: E731
    assert eta(under) > 2 * eta(~under)
    # file in, file out, chunked: the ensemble file is read in the catalog's chunks
    ens_path = tmp_path / "other.hdf5"
    test_ens.write_to(str(ens_path))
    out_path = tmp_path / "flagged.hdf5"
    f2 = DeepzSOMFlagger.make_stage(name=_name("flag"), model=finf.get_handle("model"), hdf5_groupname="",
                                    chunk_size=400, output=str(out_path))
    from rail.core.data import QPHandle

    f2.estimate(TableHandle("input", data=test), QPHandle("ensemble", path=str(ens_path)))
    back = qp.read(str(out_path))
    np.testing.assert_array_equal(back.ancil["som_cell"], out.ancil["som_cell"])
    with pytest.raises(ValueError, match="1500 PDFs but the catalog has 100 rows"):
        DeepzSOMFlagger.make_stage(name=_name("flag"), model=finf.get_handle("model"), hdf5_groupname="",
                                   output_mode="return").estimate({k: v[:100] for k, v in test.items()}, test_ens)


def test_unknown_config_keys_are_refused():
    with pytest.raises(ValueError, match=r"'som_shap'.*did you mean 'som_shape'"):
        DeepzEmbedInformer.make_stage(name=_name("inf"), som_shap=[3, 3])
    with pytest.raises(ValueError, match="bogus"):
        DeepzEmbedEstimator.make_stage(name=_name("est"), bogus=1)
    with pytest.raises(ValueError, match="bogus"):
        DeepzSOMFlagInformer.make_stage(name=_name("finf"), bogus=1)
    with pytest.raises(ValueError, match="bogus"):
        DeepzSOMFlagger.make_stage(name=_name("flag"), bogus=1)
    with pytest.raises(ValueError, match="encoder"):
        DeepzEmbedInformer.make_stage(name=_name("inf"), encoder="clip")
    with pytest.raises(ValueError, match="som_flag_metrics"):
        DeepzSOMFlagInformer.make_stage(name=_name("finf"), som_flag_metrics=["mad"])


def test_negative_nll_weight_is_refused(dc2):
    inf = DeepzEmbedInformer.make_stage(name=_name("inf"), model="unused.pkl", nll_weight=-0.1, hdf5_groupname="")
    with pytest.raises(ValueError, match="nll_weight"):
        inf.inform({k: v[:200] for k, v in dc2.train.items()})


def test_registry_quick_config(dc2):
    from rail.evaluation import deepz_registry as reg

    spec = reg.get("embed")
    inform, estimate = spec.make_configs(dc2, quick=True)
    inf = spec.informer_class.make_stage(name=_name("inf"), **inform)
    inf.inform(_rows(dc2.train, 0, 800))
    ens = spec.estimator_class.make_stage(name=_name("est"), model=inf.get_handle("model"), output_mode="return",
                                          **estimate).estimate(_rows(dc2.test, 0, 100)).data
    assert ens.npdf == 100


def test_rail_interactive_runs_embed_and_flagger(tmp_path):
    """`rail.interactive` finds the four stages (fresh process) and their functions run."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import rail.interactive
        from rail.interactive.estimation.algos import deepz_embed as de
        from rail.interactive.estimation.algos import deepz_somflag as sf
        from rail.deepz.datasets import load_dc2
        ds = load_dc2(n_train=600, n_test=200, seed=1)
        m = de.deepz_embed_informer(training_data=ds.train, hdf5_groupname="", epochs=2, ae_epochs=2,
                                    som_shape=[3, 3], som_iterations=200, som_n_boot=5, progress=False)
        ens = de.deepz_embed_estimator(input_data=ds.test, model=m["model"], hdf5_groupname="")["output"]
        fm = sf.deepz_som_flag_informer(training_data=ds.train, truth=ds.test, ensemble=ens, hdf5_groupname="",
                                        som_shape=[3, 3], som_iterations=200, som_n_boot=5)
        out = sf.deepz_som_flagger(input_data=ds.test, ensemble=ens, model=fm["model"], hdf5_groupname="")
        assert out["output"].npdf == 200 and "flag_ood" in out["output"].ancil
        print("OK")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK" in res.stdout
