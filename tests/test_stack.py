"""Stacking estimator (rail.estimation.algos.deepz_stack): synthetic inputs with known properties.

Truths are uniform on [0.3, 2.7]. Inputs ``a`` and ``b`` are calibrated Gaussians of width
0.06 whose errors are independent (so their average is over-dispersed and a sharper
combination exists); ``broad`` (a's mean plus noise, 0.21 wide: calibrated) and ``biased``
(b's mean shifted by +0.15) add no information. Each is a different qp parameterisation (mixmod, interp, hist, interp).
"""

import numpy as np
import pytest
import qp
import torch
from scipy.special import betainc
from scipy.stats import norm

from rail.estimation.algos import deepz_stack as ds

EDGES = ds.grid_edges(0.0, 3.0, 150)
CENT = np.linspace(0.0, 3.0, 151)


def _interp(mu, s):
    s = np.broadcast_to(s, mu.shape)[:, None]
    return qp.Ensemble(qp.interp, data=dict(xvals=CENT, yvals=norm.pdf(CENT[None, :], mu[:, None], s)))


def _hist(mu, s):
    e = np.linspace(0.0, 3.0, 121)
    s = np.broadcast_to(s, mu.shape)[:, None]
    p = np.diff(norm.cdf(e[None, :], mu[:, None], s), axis=1) / np.diff(e)
    return qp.Ensemble(qp.hist, data=dict(bins=e, pdfs=p))


def make_inputs(n, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.3, 2.7, n)
    mu_a = z + 0.06 * rng.standard_normal(n)
    mu_b = z + 0.06 * rng.standard_normal(n)
    ens = {
        "a": qp.Ensemble(qp.mixmod, data=dict(weights=np.ones((n, 1)), means=mu_a[:, None],
                                              stds=np.full((n, 1), 0.06))),
        "b": _interp(mu_b, 0.06),
        "broad": _hist(mu_a + 0.2 * rng.standard_normal(n), 0.21),
        "biased": _interp(mu_b + 0.15, 0.06),
    }
    return z, ens


@pytest.fixture(scope="module")
def fitted():
    torch.set_num_threads(1)
    z, ens = make_inputs(2000)
    c, h, _, kinds = ds.read_inputs(ens, EDGES, 0, z.size)
    model = ds.fit_stack(c, h, z, EDGES, list(ens), holdout_fraction=0.4, max_iter=60)
    return z, c, h, kinds, model


def test_beta_transform_matches_scipy():
    for a, b in [(1.0, 1.0), (0.3, 2.0), (3.0, 5.0), (20.0, 15.0)]:
        table = ds.beta_table(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64))
        u = np.concatenate([np.linspace(0.0, 1.0, 1001), [1e-9, 1 - 1e-9]])
        got = ds.beta_transform(torch.as_tensor(u)[None, :], table).numpy()[0]
        assert np.abs(got - betainc(a, b, u)).max() < 2e-4, (a, b)


def test_input_cdfs_of_each_representation():
    z, ens = make_inputs(50, seed=3)
    c, h, p_out, kinds = ds.read_inputs(ens, EDGES, 0, 50)
    assert kinds == ["mixmod", "interp", "hist", "interp"]
    assert c.shape == (50, 4, EDGES.size) and h.all()
    assert np.all(np.diff(c, axis=2) >= -1e-6) and np.allclose(c[:, :, 0], 0) and np.allclose(c[:, :, -1], 1)
    # mixmod: the exact normal CDF (renormalised to [0, 3])
    mu = ens["a"].objdata["means"][:, 0]
    ref = norm.cdf(EDGES[None, :], mu[:, None], 0.06)
    ref = (ref - ref[:, :1]) / (ref[:, -1:] - ref[:, :1])
    assert np.abs(c[:, 0] - ref).max() < 1e-5
    # hist: its CDF, i.e. qp's, at the grid
    assert np.abs(c[:, 2] - ens["broad"].cdf(EDGES)).max() < 1e-4


def test_weights_favour_the_good_inputs(fitted):
    z, c, h, _, model = fitted
    w = dict(zip(model["inputs"], model["weights"][-1]))
    assert w["a"] > 0.25 and w["b"] > 0.25 and w["broad"] < 0.05, w
    assert model["a"][-1] > 1 and model["b"][-1] > 1  # the pool is sharpened
    # the plain linear pool (no beta transform) puts (nearly) all weight on a and b; with the
    # transform the biased copy can keep some weight: its fixed offset above b's mean is
    # something the transform can use (the held-out CRPS is lower with it, see below)
    wl, a, b = ds.fit_pool(torch.as_tensor(c), torch.as_tensor(h), torch.as_tensor(z), torch.as_tensor(EDGES),
                           recalibrate=False, max_iter=60)
    assert (a, b) == (1.0, 1.0)
    assert wl[0] + wl[1] > 0.8 and wl[3] < 0.1, wl


def test_stack_beats_the_best_single_and_is_calibrated(fitted):
    """On held-out rows: stack CRPS <= best single input's, within 2 standard errors of the
    paired difference; PIT of the stack is uniform (KS below the 1% critical value
    1.63/sqrt(n)) while the equal-weight average's is not (over-dispersed: too many central
    PIT values)."""
    z, c, h, _, model = fitted
    rng = np.random.default_rng(42)  # fit_stack's held-out split
    perm = rng.permutation(z.size)
    out = np.sort(perm[: int(round(0.4 * z.size))])
    d = model["diagnostics"]
    assert d["holdout"]["n_holdout"] == out.size
    ct, ht = torch.as_tensor(c[out]), torch.as_tensor(h[out])
    e, zt = torch.as_tensor(EDGES), torch.as_tensor(z[out])
    per = {}
    for i, name in enumerate(model["inputs"]):
        per[name] = ds.scores(ds.pool(ct, ht, torch.as_tensor(np.eye(4)[i])), e, zt)["crps"].numpy()
    best = min(per, key=lambda k: per[k].mean())
    assert best in ("a", "b")
    # the stack fitted on the other rows
    diag = d["stack"]
    n = out.size
    se = np.std(per["a"] - per["b"]) / np.sqrt(n) + np.std(per[best]) / np.sqrt(n)
    assert diag["crps"] <= per[best].mean() + 2 * se
    assert diag["crps"] < d["equal_weights"]["crps"]
    crit = 1.63 / np.sqrt(n)
    assert diag["pit_ks"] < crit, diag
    assert d["equal_weights"]["pit_ks"] > crit
    pit_eq = ds.scores(ds.pool(ct, ht, torch.full((4,), 0.25, dtype=torch.float64)), e, zt)["pit"].numpy()
    assert np.mean((pit_eq > 0.25) & (pit_eq < 0.75)) > 0.55


def test_stack_ensemble_ancil_and_normalisation(fitted):
    z, c, h, _, model = fitted
    ens = ds.stack_ensemble(model, c[:300], h[:300], np.zeros((300, 4)))
    assert ens.npdf == 300 and ens.gen_class.name == "hist"
    assert np.allclose((ens.objdata["pdfs"] * np.diff(EDGES)).sum(1), 1.0, atol=1e-5)
    for key in ("zmode", "zmean", "zmedian", "zstd", "z_q16", "z_q84", "p_outside"):
        assert np.isfinite(ens.ancil[key]).all(), key
    assert np.median(np.abs(ens.ancil["zmedian"] - z[:300])) < 0.08
    # the CDF of the output at the grid nodes is the stacked CDF
    g = ds.stack_cdfs(model, c[:300], h[:300])
    assert np.abs(ens.cdf(EDGES) - g).max() < 1e-4


def test_per_bin_weights_follow_the_better_input():
    """Input a is sharp for bright objects and broad for faint ones, b the reverse."""
    rng = np.random.default_rng(5)
    n = 1600
    z = rng.uniform(0.3, 2.7, n)
    mag = rng.uniform(20, 24, n)
    bright = mag < 22
    sa, sb = np.where(bright, 0.05, 0.25), np.where(bright, 0.25, 0.05)
    ens = {"a": _interp(z + sa * rng.standard_normal(n), sa), "b": _hist(z + sb * rng.standard_normal(n), sb)}
    c, h, _, _ = ds.read_inputs(ens, EDGES, 0, n)
    model = ds.fit_stack(c, h, z, EDGES, ["a", "b"], bin_col="mag", bin_values=mag, bin_edges=[22.0],
                         min_bin_objects=200, holdout_fraction=0.0, max_iter=40)
    w = model["weights"]
    assert w.shape == (3, 2) and w[0, 0] > 0.8 and w[1, 1] > 0.8
    assert model["bin_counts"].tolist() == [int(bright.sum()), int((~bright).sum()), n]
    # applied per row: better than the global row of the same model (NaN bin values -> global)
    e, zt = torch.as_tensor(EDGES), torch.as_tensor(z)
    per_bin = ds.scores(torch.as_tensor(ds.stack_cdfs(model, c, h, mag)), e, zt)["crps"].mean()
    glob = ds.scores(torch.as_tensor(ds.stack_cdfs(model, c, h, np.full(n, np.nan))), e, zt)["crps"].mean()
    assert per_bin < 0.8 * glob
    with pytest.raises(ValueError, match="per bin of 'mag'"):
        ds.stack_cdfs(model, c, h)


# ---------------------------------------------------------------- stages and bad inputs


def _write(tmp_path, ens, tag):
    paths = {}
    for k, e in ens.items():
        paths[k] = str(tmp_path / f"{tag}_{k}.hdf5")
        e.write_to(paths[k])
    return paths


def test_stages_end_to_end(tmp_path):
    from rail.core.data import TableHandle

    from rail.deepz import __init__  # noqa: F401  (registration)

    z, ens = make_inputs(1300, seed=7)
    val = {k: v[:800] for k, v in ens.items()}
    test = {k: v[800:] for k, v in ens.items()}
    pv, pt = _write(tmp_path, val, "val"), _write(tmp_path, test, "test")
    inf = ds.DeepzStackInformer.make_stage(name="stack_inform_t", model=str(tmp_path / "stack.pkl"), inputs=pv,
                                           nzbins=150, hdf5_groupname="", holdout_fraction=0.0, max_iter=30,
                                           chunk_size=300)
    inf.inform(TableHandle("input", data={"redshift": z[:800]}))
    model = inf.model
    assert model["inputs"] == list(ens) and model["input_kinds"] == ["mixmod", "interp", "hist", "interp"]
    assert all(isinstance(v, (np.ndarray, list, dict, str, int, float, bool)) for v in model.values())
    est = ds.DeepzStackEstimator.make_stage(name="stack_est_t", model=inf.get_handle("model"), inputs=pt,
                                            hdf5_groupname="", chunk_size=200, output=str(tmp_path / "out.hdf5"))
    out = est.estimate(TableHandle("input", data={"redshift": z[800:], "object_id": np.arange(500)})).data
    assert out.npdf == 500
    assert np.median(np.abs(out.ancil["zmode"] - z[800:])) < 0.08
    # the same model applied to ensembles in memory gives the same PDFs
    c, h, p, _ = ds.read_inputs(test, ds.grid_edges(0, 3, 150), 0, 500)
    direct = ds.stack_ensemble(model, c, h, p)
    assert np.allclose(out.objdata["pdfs"], direct.objdata["pdfs"], atol=1e-5)
    # zmode of the smoothed stacked PDF (option mode_smoothing): the same PDFs, the stage's zmode is
    # stack_ensemble's, and it is not the raw most probable bin's
    est_s = ds.DeepzStackEstimator.make_stage(name="stack_est_smooth", model=inf.get_handle("model"), inputs=pt,
                                              hdf5_groupname="", chunk_size=200, mode_smoothing=0.05,
                                              output=str(tmp_path / "out_smooth.hdf5"))
    out_s = est_s.estimate(TableHandle("input", data={"redshift": z[800:]})).data
    assert np.allclose(out_s.objdata["pdfs"], out.objdata["pdfs"])
    want = ds.stack_ensemble(model, c, h, p, mode_smoothing=0.05).ancil["zmode"]
    np.testing.assert_allclose(out_s.ancil["zmode"], want, atol=1e-6)
    assert np.mean(out_s.ancil["zmode"] != out.ancil["zmode"]) > 0.5
    for bad_opts, msg in (({"mode_smoothing": -0.01}, "mode_smoothing"),
                          ({"mode_smoothing": 0.03, "mode_window": 0.06}, "cannot both")):
        with pytest.raises(ValueError, match=msg):
            ds.DeepzStackEstimator.make_stage(name=f"stack_est_bad_{len(bad_opts)}", model=inf.get_handle("model"),
                                              inputs=pt, hdf5_groupname="", **bad_opts)

    # the model file is not a pickle (rail.deepz.modelfile) and is read back from its path
    path = tmp_path / "stack.pkl"
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    est_f = ds.DeepzStackEstimator.make_stage(name="stack_est_file", model=str(path), inputs=pt, hdf5_groupname="",
                                              output=str(tmp_path / "out_file.hdf5"))
    out_f = est_f.estimate(TableHandle("input", data={"redshift": z[800:]})).data
    assert np.allclose(out_f.objdata["pdfs"], out.objdata["pdfs"])

    # estimate-time inputs must be the model's estimators
    bad = dict(pt)
    bad.pop("broad")
    est2 = ds.DeepzStackEstimator.make_stage(name="stack_est_t2", model=inf.get_handle("model"), inputs=bad,
                                             hdf5_groupname="")
    with pytest.raises(ValueError, match="missing \\['broad'\\]"):
        est2.estimate(TableHandle("input", data={"redshift": z[800:]}))
    # row count of the table and of the files
    est3 = ds.DeepzStackEstimator.make_stage(name="stack_est_t3", model=inf.get_handle("model"), inputs=pt,
                                             hdf5_groupname="")
    with pytest.raises(ValueError, match="has 500 PDFs but the input table has 499 rows"):
        est3.estimate(TableHandle("input", data={"redshift": z[800:1299]}))


def test_bad_inputs_raise(tmp_path):
    from rail.core.data import TableHandle

    z, ens = make_inputs(200, seed=9)
    paths = _write(tmp_path, ens, "v")

    def inform(data, inputs, **kw):
        st = ds.DeepzStackInformer.make_stage(name=f"stack_bad_{len(kw)}_{id(data)}", inputs=inputs,
                                              hdf5_groupname="", nzbins=60, holdout_fraction=0.0, max_iter=5, **kw)
        st.inform(TableHandle("input", data=data))

    with pytest.raises(ValueError, match="has 200 PDFs but the validation table has 150 rows"):
        inform({"redshift": z[:150]}, paths)
    with pytest.raises(FileNotFoundError, match="Input 'x'"):
        inform({"redshift": z}, {**paths, "x": str(tmp_path / "nope.hdf5")})
    with pytest.raises(ValueError, match="non-empty mapping"):
        inform({"redshift": z}, {})
    zbad = z.copy()
    zbad[[3, 17]] = np.nan
    with pytest.raises(ValueError, match=r"2 NaN/inf value\(s\) \(rows \[3, 17\]\)"):
        inform({"redshift": zbad}, paths)
    with pytest.raises(ValueError, match="outside"):
        inform({"redshift": z + 1.0}, paths)
    with pytest.raises(ValueError, match="'score'"):
        inform({"redshift": z}, paths, score="brier")
    with pytest.raises(ValueError, match="Unknown config"):
        inform({"redshift": z}, paths, scroe="crps")
    with pytest.raises((TypeError, ValueError), match="recalibrate"):  # typed options: "no" is not a bool
        inform({"redshift": z}, paths, recalibrate="no")
    # a NaN PDF: the error names the input and the row
    y = ens["b"].objdata["yvals"].copy()
    y[42, 10] = np.nan
    nan_ens = qp.Ensemble(qp.interp, data=dict(xvals=CENT, yvals=y, norm=False, warn=False))
    with pytest.raises(ValueError, match=r"Input 'b': 1 PDF\(s\) are NaN/inf.*rows \[42\]"):
        ds.read_inputs({"a": ens["a"], "b": nan_ens}, EDGES, 0, 200)


def test_scores_match_the_harness_and_the_histogram():
    """CRPS of the stacked CDF (linear between nodes) equals the comparison harness's
    crps_grid; the log score is -log of the output histogram's density at the truth; the PIT
    is its CDF there."""
    from rail.evaluation.deepz_metrics import crps_grid

    z, ens = make_inputs(300, seed=11)
    c, h, _, _ = ds.read_inputs(ens, EDGES, 0, 300)
    g = ds.pool(torch.as_tensor(c, dtype=torch.float64), torch.as_tensor(h),
                torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64))
    s = ds.scores(g, torch.as_tensor(EDGES), torch.as_tensor(z))
    assert np.allclose(s["crps"].numpy(), crps_grid(g.numpy(), EDGES, z), atol=1e-9)
    hist = qp.Ensemble(qp.hist, data=dict(bins=EDGES, pdfs=np.diff(g.numpy(), axis=1) / np.diff(EDGES)))
    dens = hist.pdf(z[:, None])[:, 0]  # each PDF at its own truth
    assert np.allclose(s["logscore"].numpy(), -np.log(dens), atol=1e-6)
    assert np.allclose(s["pit"].numpy(), hist.cdf(z[:, None])[:, 0], atol=1e-6)
