"""Tests of the comparison harness (rail.evaluation.deepz_*): metrics against hand-computed
values, chunked == one-shot, agreement with RAIL's own evaluators on a FlexZBoost estimate,
the CLI, one example ceci pipeline and the notebooks (quick mode)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import qp

from rail.evaluation import deepz_metrics as dm

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- hand-computed metrics


def test_point_metrics_hand_computed():
    zt = np.array([0.0, 1.0, 0.5, 2.0, 1.0])
    zp = np.array([0.1, 1.2, 0.5, 1.0, 0.9])
    # dz/(1+z) = [0.1, 0.1, 0, -1/3, -0.05]
    d = np.array([0.1, 0.1, 0.0, -1 / 3, -0.05])
    np.testing.assert_allclose(dm.dz_norm(zp, zt), d)
    assert dm.sigma_nmad_nomedian(zp, zt) == pytest.approx(1.4826 * 0.1)  # median |d| = 0.1
    assert dm.eta(zp, zt) == pytest.approx(1 / 5)  # only |-1/3| > 0.15
    assert dm.bias_median(zp, zt) == pytest.approx(0.0)  # median of d
    assert dm.bias_mean(zp, zt) == pytest.approx(np.mean(d))
    inl = np.array([0.1, 0.1, 0.0, -0.05])
    assert dm.bias_inlier_mean(zp, zt) == pytest.approx(inl.mean())
    assert dm.sigma_inlier_std(zp, zt) == pytest.approx(inl.std())
    # sigma_nmad subtracts the median: shift every residual by +0.2 (zp += 0.2 (1 + zt))
    zp2 = zp + 0.2 * (1 + zt)
    assert dm.bias_median(zp2, zt) == pytest.approx(0.2)
    assert dm.sigma_nmad(zp2, zt) == pytest.approx(1.4826 * 0.1)  # |d - median| median = 0.1
    assert dm.sigma_nmad_nomedian(zp2, zt) == pytest.approx(1.4826 * 0.2)  # median of .3 .3 .2 .133 .15
    rail = dm.rail_point_metrics(zp, zt)
    # sigma_IQR: percentiles 25/75 of d = -0.05, 0.1 -> 0.15 / 1.349
    assert rail["rail_sigma_iqr"] == pytest.approx(0.15 / 1.349)
    # cut max(0.06, 3*0.1112) = 0.3336 -> only |-1/3| = 0.3333 is NOT above it -> 0
    assert rail["rail_outlier_rate"] == pytest.approx(0.0)


def test_pco_and_pit_metrics_hand_computed():
    pit = np.array([0.001, 0.5, 0.999, 0.3, 0.996])
    assert dm.pco(pit) == pytest.approx(3 / 5)  # < 0.005 or > 0.995
    # KS statistic of a perfectly even sample of n points: D = 1/n ... vs (i-0.5)/n midpoints: 0.5/n
    n = 200
    even = (np.arange(n) + 0.5) / n
    assert dm.pit_metrics(even)["pit_ks"] == pytest.approx(0.5 / n)
    # CvM of the midpoints: 1/(12 n)
    assert dm.pit_metrics(even)["pit_cvm"] == pytest.approx(1 / (12 * n))


def test_crps_hand_computed_hist_and_gaussian():
    # uniform PDF on [0, 1] at z = 0.5: int_0^.5 x^2 + int_.5^1 (1-x)^2 = 1/12
    h = qp.Ensemble(qp.hist, data=dict(bins=np.array([0.0, 0.5, 1.0]), pdfs=np.array([[1.0, 1.0]])))
    assert dm.crps(h, [0.5], limits=(0.0, 1.0), npts=101)[0] == pytest.approx(1 / 12, rel=1e-6)
    # truth outside the support adds the distance: z = 1.5 -> 1/3 + 0.5 (int_0^1 x^2 + 0.5)
    assert dm.crps(h, [1.5], limits=(0.0, 1.0), npts=101)[0] == pytest.approx(1 / 3 + 0.5, rel=1e-6)
    # Gaussian N(mu, s) at z: s [w(2Phi(w)-1) + 2phi(w) - 1/sqrt(pi)], w = (z-mu)/s
    from scipy.stats import norm

    mu, s, z = 1.0, 0.2, 1.3
    w = (z - mu) / s
    exact = s * (w * (2 * norm.cdf(w) - 1) + 2 * norm.pdf(w) - 1 / np.sqrt(np.pi))
    mix = qp.Ensemble(qp.mixmod, data=dict(weights=np.array([[1.0]]), means=np.array([[mu]]), stds=np.array([[s]])))
    assert dm.crps(mix, [z])[0] == pytest.approx(exact, rel=1e-10)
    grid = np.linspace(-1.0, 3.0, 4001)
    interp = qp.Ensemble(qp.interp, data=dict(xvals=grid, yvals=norm.pdf(grid, mu, s)[None, :]))
    assert dm.crps(interp, [z], limits=(-1.0, 3.0), npts=4001)[0] == pytest.approx(exact, rel=1e-4)


def test_cde_and_brier_hand_computed():
    # uniform on [0, 1] tabulated on grid 0, .5, 1: int f^2 = 1, f(nearest) = 1 -> -1
    grid = np.array([0.0, 0.5, 1.0])
    t1, t2 = dm.cde_terms(np.ones((1, 3)), grid, [0.7])
    assert t1[0] == pytest.approx(1.0) and t2[0] == pytest.approx(1.0)
    assert dm.nearest_index(grid, [0.24, 0.26, 0.25, 2.0, -1.0]).tolist() == [0, 1, 0, 2, 0]
    # Brier as qp defines it: limits (0, 0.9), dx = 0.25 -> int(0.9/0.25) = 3 points 0, 0.45, 0.9,
    # cells [-0.225, 0.225), [0.225, 0.675), [0.675, 1.125]
    h = qp.Ensemble(qp.hist, data=dict(bins=np.array([0.0, 1.0]), pdfs=np.array([[1.0], [1.0]])))
    b = dm.brier_terms(h, [0.4, 2.0], limits=(0.0, 0.9), dx=0.25)
    # p = [1, 1, 1] (density); z = 0.4: o = [0, 1, 0] -> 1 + 0 + 1 = 2; z = 2 (off grid): 3
    assert b.tolist() == pytest.approx([2.0, 3.0])
    from qp.metrics.metrics import calculate_brier

    assert b[0] == pytest.approx(calculate_brier(h, np.array([0.4, 0.4]), (0.0, 0.9), 0.25))


def _random_mixtures(n, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.dirichlet([1, 1, 1], n)
    mu = rng.uniform(0.2, 2.5, (n, 3))
    s = rng.uniform(0.03, 0.3, (n, 3))
    z = np.clip(mu[:, 0] + rng.normal(0, 0.2, n), 0.01, 2.99)
    return qp.Ensemble(qp.mixmod, data=dict(weights=w, means=mu, stds=s)), z, rng.uniform(18, 26, n)


def test_chunked_equals_one_shot(tmp_path):
    ens, z, mag = _random_mixtures(1000)
    grid = np.linspace(0, 3, 301)
    hist = qp.Ensemble(qp.interp, data=dict(xvals=grid, yvals=ens.pdf(grid)))
    hist.set_ancil({"zmode": grid[np.argmax(ens.pdf(grid), axis=1)]})
    path = tmp_path / "est.hdf5"
    hist.write_to(str(path))
    cfg = dm.MetricConfig.for_range(0.0, 3.0)
    one = dm.MetricAccumulator(cfg, per_object=True)
    one.add(hist, z, mag)
    chunked = dm.accumulate_estimate(str(path), z, mag, config=cfg, chunk_size=137, per_object=True)
    a, b = one.per_object(), chunked.per_object()
    for k in dm.PER_OBJECT_KEYS:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-10, atol=1e-12, err_msg=k)
    ra = dm.tidy_metrics(a, "x", np.linspace(0, 3, 4), np.arange(18, 27, 2.0))
    rb = dm.tidy_metrics(b, "x", np.linspace(0, 3, 4), np.arange(18, 27, 2.0))
    assert [r["value"] for r in ra] == pytest.approx([r["value"] for r in rb], nan_ok=True)
    # binned rows: counts add up to the total
    n_z = sum(r["n"] for r in ra if r["bin_type"] == "redshift" and r["metric"] == "eta")
    assert n_z == 1000


def test_accumulator_rejects_length_mismatch(tmp_path):
    ens, z, _ = _random_mixtures(20)
    with pytest.raises(ValueError, match="20 PDFs but the truth table has 19"):
        dm.accumulate_estimate(ens, z[:19])


# ----------------------------------------------------------------- RAIL agreement (FlexZBoost)


@pytest.fixture(scope="module")
def flexzboost_estimate(tmp_path_factory):
    pytest.importorskip("rail.estimation.algos.flexzboost")
    from rail.core.data import TableHandle

    from rail.evaluation import deepz_registry as reg
    from rail.evaluation.deepz_compare import load_dataset

    tmp = tmp_path_factory.mktemp("fzb")
    ds = load_dataset("dc2", 800, 600, 0)
    spec = reg.get("flexzboost")
    icfg, ecfg = spec.make_configs(ds, True)
    inf = spec.informer_class.make_stage(name="test_eval_fzb_inform", model=str(tmp / "fzb.pkl"), **icfg)
    inf.inform(TableHandle("input", data=ds.train))
    est = spec.estimator_class.make_stage(name="test_eval_fzb_estimate", model=inf.get_handle("model"),
                                          output=str(tmp / "fzb.hdf5"), calculated_point_estimates=["zmode"],
                                          **ecfg)
    handle = est.estimate(TableHandle("input", data=ds.test))
    return Path(handle.path), ds


def test_flexzboost_row_agrees_with_rail_evaluators(flexzboost_estimate, tmp_path):
    from qp.metrics.pit import PIT
    from rail.evaluation.dist_to_point_evaluator import DistToPointEvaluator
    from rail.evaluation.point_to_point_evaluator import PointToPointEvaluator

    from rail.evaluation.deepz_compare import compare

    path, ds = flexzboost_estimate
    res = compare({"flexzboost": path}, ds.test, outdir=tmp_path, zmin=0.0, zmax=3.0, mag_col="mag_i_lsst",
                  chunk_size=250, plots=False, progress=False, print_table=False)
    row = res.overall().loc["flexzboost"]
    ens = qp.read(str(path))
    z = ds.test["redshift"]
    truth = {"photometry": {"redshift": z}}
    p2p = PointToPointEvaluator.make_stage(
        name="test_eval_p2p", point_estimate_key="zmode", hdf5_groupname="photometry", force_exact=True,
        metrics=["point_stats_iqr", "point_bias", "point_outlier_rate", "point_stats_sigma_mad"],
        output=str(tmp_path / "p2p.hdf5"), summary=str(tmp_path / "p2p_summary.hdf5"))
    s1 = p2p.evaluate(ens, truth)["summary"].data
    grid = np.linspace(0.0, 3.0, 301)
    d2p = DistToPointEvaluator.make_stage(
        name="test_eval_d2p", hdf5_groupname="photometry", reference_dictionary_key="redshift", force_exact=True,
        metrics=["cdeloss", "brier"],
        metric_config={"cdeloss": {"eval_grid": grid}, "brier": {"limits": [0.0, 3.0], "dx": 0.01}},
        output=str(tmp_path / "d2p.hdf5"), summary=str(tmp_path / "d2p_summary.hdf5"))
    s2 = d2p.evaluate(ens, truth)["summary"].data
    pit = PIT(ens, z)
    expected = {
        "rail_sigma_iqr": s1["point_stats_iqr"][0],
        "bias_median": s1["point_bias"][0],
        "sigma_nmad": s1["point_stats_sigma_mad"][0],
        "rail_outlier_rate": s1["point_outlier_rate"][0],
        "cde_loss": s2["cdeloss"][0],
        "brier": s2["brier"][0],
        "pit_ks": pit.evaluate_PIT_KS().statistic,
        "pit_cvm": pit.evaluate_PIT_CvM().statistic,
        "pit_ad": pit.evaluate_PIT_anderson_ksamp().statistic,
        # counted on qp's own PIT values (qp's evaluate_PIT_outlier_rate reads a quantile fit instead)
        "pit_outlier_rate": np.mean((pit.pit_samps < 1e-4) | (pit.pit_samps > 0.9999)),
    }
    for key, val in expected.items():
        assert float(row[key]) == pytest.approx(float(val), rel=1e-6, abs=1e-9), key
    # the FlexZBoost model is a real fit: better than a 0.15 outlier cut would allow at random
    assert float(row["eta"]) < 0.5


def test_cli_on_estimate_files(flexzboost_estimate, tmp_path):
    import h5py

    from rail.evaluation import deepz_cli
    from rail.evaluation.deepz_compare import read_metrics_hdf5

    path, ds = flexzboost_estimate
    truth = tmp_path / "truth.hdf5"
    with h5py.File(truth, "w") as f:
        f["redshift"] = ds.test["redshift"]
        f["mag_i_lsst"] = ds.test["mag_i_lsst"]
    out = tmp_path / "out"
    rc = deepz_cli.main(["--truth", str(truth), "--estimate", f"fzb={path}", "--estimate", f"fzb2={path}",
                         "--mag-col", "mag_i_lsst", "--out", str(out), "--quiet", "--markdown"])
    assert rc == 0
    for name in ("metrics.csv", "metrics.hdf5", "pit_qq.png", "zphot_zspec.png", "metrics_vs_redshift.png",
                 "metrics_vs_magnitude.png", "example_pdfs.png"):
        assert (out / name).is_file(), name
    import pandas as pd

    table = pd.read_csv(out / "metrics.csv")
    assert list(table.columns) == ["estimator", "bin_type", "bin_lo", "bin_hi", "metric", "value", "n"]
    assert set(table.bin_type) == {"all", "redshift", "magnitude"}
    a = table[table.estimator == "fzb"].value.to_numpy()
    b = table[table.estimator == "fzb2"].value.to_numpy()
    np.testing.assert_allclose(a, b, equal_nan=True)
    back = read_metrics_hdf5(out / "metrics.hdf5")
    np.testing.assert_allclose(back.value.to_numpy(), table.value.to_numpy(), equal_nan=True)
    # errors: no inputs, bad column (one line naming it; the exception itself with --debug), module entry point
    assert deepz_cli.main([]) == 2
    bad = ["--truth", str(truth), "--estimate", f"fzb={path}", "--redshift-col", "nope", "--out", str(out), "--quiet"]
    assert deepz_cli.main(bad) == 1
    with pytest.raises(KeyError, match="nope"):
        deepz_cli.main([*bad, "--debug"])
    r = subprocess.run([sys.executable, "-m", "rail.evaluation.deepz_cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--estimate" in r.stdout


def test_compare_stage_interactive(flexzboost_estimate, tmp_path):
    from rail.core.data import QPHandle

    from rail.evaluation.deepz_stages import DeepzCompareEvaluator

    path, ds = flexzboost_estimate
    stage = DeepzCompareEvaluator.make_stage(
        name="test_eval_compare_stage", input_label="fzb", estimates={"again": str(path)}, mag_col="mag_i_lsst",
        plot_dir=str(tmp_path / "plots"), plots=False, progress=False, output=str(tmp_path / "m.hdf5"))
    out = stage.evaluate(QPHandle("fzb_in", path=str(path)), ds.test).data
    est = np.asarray(out["estimator"]).astype(str)
    assert set(est) == {"fzb", "again"}
    assert (tmp_path / "plots" / "metrics.csv").is_file()


def test_registry_has_baselines_and_bpz_needs_filter_curves():
    from rail.evaluation import deepz_registry as reg
    from rail.evaluation.deepz_compare import _supported

    assert {"nnc", "flexzboost", "bpz"} <= set(reg.ESTIMATORS)
    assert reg.get("bpz").baseline and reg.get("flexzboost").baseline

    class _DS:
        name = "boss"
        bands = ["MAG_U", "MAG_G"]
        extra = {}

    assert "--bpz-filters" in _supported(reg.get("bpz"), _DS())
    with pytest.raises(KeyError, match="known"):
        reg.get("no_such_estimator")


# ----------------------------------------------------------------- examples


def _env():
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("DEEPZ_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    return env


def test_example_yamls_match_generator(tmp_path):
    """The checked-in YAMLs are what examples/make_pipelines.py writes from the registry."""
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import make_pipelines
    finally:
        sys.path.pop(0)
    written = make_pipelines.write_pipelines(tmp_path, datasets=("dc2",), rel_to=tmp_path)
    import yaml

    for p in written:
        ref = REPO / "examples" / p.name
        if not ref.is_file() and p.stem.split("_")[0] not in ("nnc", "flexzboost", "bpz"):
            continue  # a newly registered estimator: regenerate with python examples/make_pipelines.py
        assert ref.is_file(), f"examples/{p.name} missing: run python examples/make_pipelines.py"
        got, want = yaml.safe_load(p.read_text()), yaml.safe_load(ref.read_text())
        got.pop("config"), want.pop("config")
        assert got == want, p.name
        cfg_got = yaml.safe_load((tmp_path / "configs" / p.name.replace(".yml", "_config.yml")).read_text())
        cfg_want = yaml.safe_load((REPO / "examples" / "configs" / p.name.replace(".yml", "_config.yml")).read_text())
        assert cfg_got == cfg_want, p.name


def test_ceci_runs_nnc_example_pipeline(tmp_path):
    """Run the checked-in examples/nnc_dc2.yml with ceci, on a small sample with quick settings."""
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import make_pipelines
    finally:
        sys.path.pop(0)
    make_pipelines.write_pipelines(tmp_path, keys=["nnc"], datasets=("dc2",), quick=True, n_train=400,
                                   n_test=300, rel_to=tmp_path)
    out = tmp_path / "out"
    cmd = ["ceci", "examples/nnc_dc2.yml", f"config={tmp_path / 'configs' / 'nnc_dc2_config.yml'}",
           f"output_dir={out}", f"log_dir={tmp_path / 'logs'}"]
    ceci = Path(sys.executable).parent / "ceci"
    if ceci.exists():
        cmd[0] = str(ceci)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_env(), timeout=400)
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.out")) if (tmp_path / "logs").exists() else ""
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + logs[-3000:]
    assert (out / "pz_nnc.hdf5").is_file()
    table = (out / "compare_nnc" / "metrics.csv").read_text()
    assert "nnc,all" in table and "sigma_nmad" in table
    assert qp.data_length(str(out / "pz_nnc.hdf5")) == 300


@pytest.mark.parametrize("name", ["compare_dc2", "compare_boss", "compare_catalogue"])
def test_notebooks_execute_quick(name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    if name == "compare_boss":  # the BOSS notebook needs the shared data: a test that cannot run says so
        from rail.deepz.datasets import require_shared

        try:
            require_shared("sdss_boss_dr10")
        except FileNotFoundError as err:
            pytest.skip(f"compare_boss notebook not run: {err}")
    monkeypatch.setenv("DEEPZ_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("DEEPZ_NOTEBOOK_ESTIMATORS", "nnc,flexzboost")
    monkeypatch.setenv("DEEPZ_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(REPO / "examples" / f"{name}.ipynb", as_version=4)
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:  # pragma: no cover
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name", "python3"], check=True)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "sigma_nmad" in text
    assert any(tmp_path.rglob("metrics.csv"))


def test_all_runs_deep_estimators_before_the_baselines():
    from rail.evaluation import deepz_registry as reg
    from rail.evaluation.deepz_compare import _resolve_keys

    keys = _resolve_keys("all")
    assert sorted(keys) == sorted(k for k, s in reg.ESTIMATORS.items() if s.in_all)
    flags = [reg.ESTIMATORS[k].baseline for k in keys]
    assert flags == sorted(flags) and any(flags) and not all(flags)
    assert _resolve_keys("flexzboost,nnc") == ["flexzboost", "nnc"]  # an explicit order is kept


def test_ensemble_pdf_of_mixtures_is_qps_pdf():
    """Gaussian mixtures are evaluated directly (fast path); the values are qp's."""
    rng = np.random.default_rng(4)
    n, k = 300, 7
    w = rng.dirichlet(np.full(k, 0.5), size=n)
    w[:5, 0] = 0.0  # a zero weight
    w /= w.sum(1, keepdims=True)
    mu = rng.uniform(-0.5, 3.5, size=(n, k))
    mu[:3, 1] = 40.0  # a component far from the grid (underflowing terms)
    s = rng.uniform(0.002, 0.3, size=(n, k))
    ens = qp.Ensemble(qp.mixmod, data=dict(weights=w, means=mu, stds=s))
    grid = np.linspace(0.0, 3.0, 301)
    fast = dm.ensemble_pdf(ens, grid)
    ref = np.asarray(ens.pdf(grid))
    assert fast.shape == (n, grid.size)
    np.testing.assert_allclose(fast, ref, rtol=1e-12, atol=1e-290)
    # the row blocking does not matter (beyond the order of float64 sums)
    from rail.deepz.gmm import mixture_pdf_on_grid

    np.testing.assert_allclose(mixture_pdf_on_grid(w, mu, s, grid, chunk=7), fast, rtol=1e-13, atol=1e-290)
    # histograms are evaluated directly too (qp's bin lookup; re-normalised: equal to rounding)
    hist = qp.Ensemble(qp.hist, data=dict(bins=np.linspace(0, 3, 31), pdfs=rng.uniform(0.1, 1.0, size=(4, 30))))
    np.testing.assert_allclose(dm.ensemble_pdf(hist, grid), np.asarray(hist.pdf(grid)), rtol=1e-13, atol=0)


def test_qso_preset_one_row_per_object_and_disjoint_split():
    """The quasar catalogue preset (shared data; skipped without it)."""
    from rail.deepz import datasets

    try:
        ds = datasets.load("qso")
    except FileNotFoundError as err:
        pytest.skip(f"qso preset not tested: {err}")
    tr, te = ds.train, ds.test
    assert len(tr["Z"]) + len(te["Z"]) == 4379  # 4,644 rows, 227 objects on 2-3 rows kept once
    assert not np.isin(tr["objID"], te["objID"]).any()
    assert ds.bands == ["umag", "gmag", "rmag", "imag", "zmag"] and ds.redshift_col == "Z"
    assert np.all((te["Z"] >= 2.75) & (te["Z"] <= ds.zmax)) and ds.zmin == 2.5
    again = datasets.load("qso")
    np.testing.assert_array_equal(again.test["objID"], te["objID"])  # seeded split


def test_quasar_benchmark_says_when_the_data_is_absent(monkeypatch, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import quasars
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    from rail.deepz import datasets

    def absent(sub):
        raise FileNotFoundError(f"shared data folder {sub!r} not found")

    monkeypatch.setattr(datasets, "require_shared", absent)
    assert quasars.main(["--seeds", "0"]) == 1
    assert "sdss_qso_stamps" in capsys.readouterr().out


def test_depth_benchmark_degrades_only_the_measured_test_photometry(benchmark_module):
    from types import SimpleNamespace

    from rail.deepz.augment import depth_from_errors

    bench = benchmark_module("depth_augment")
    rng = np.random.default_rng(11)
    n, bands = 4000, ["MAG_G", "MAG_R"]
    table = {"Z": rng.uniform(0, 1, n), "object_id": np.arange(n)}
    for b in bands:  # a deep catalogue: 5-sigma depth 24, objects at 19-21.5
        f = 10 ** (-0.4 * rng.uniform(19, 21.5, n))
        sig = 10 ** (-0.4 * 24.0) / 5
        table[b] = -2.5 * np.log10(f)
        table[b.replace("MAG", "MAGERR")] = 1.0857 * sig / f
    table["MAG_G"][:50] = 99.0  # non-detections stay as they are
    ds = SimpleNamespace(bands=bands, err_bands=[b.replace("MAG", "MAGERR") for b in bands], redshift_col="Z",
                         mag_limits={"MAG_G": 23.0, "MAG_R": 23.0}, extra={"nondetect_val": 99.0}, test=table)
    before = {k: v.copy() for k, v in table.items()}
    copies = bench.make_test_copies(ds, {"MAG_G": 21.0, "MAG_R": 22.0}, split=0.3, seed=0)
    for k in table:  # the input is not modified; redshifts and ids are copied
        np.testing.assert_array_equal(table[k], before[k])
        if k in ("Z", "object_id"):
            np.testing.assert_array_equal(copies["shallow"][k], table[k])
    shallow = copies["shallow"]
    assert (shallow["MAG_G"][:50] == 99.0).all() and (shallow["MAGERR_G"][:50] == before["MAGERR_G"][:50]).all()
    assert not np.array_equal(shallow["MAG_R"], table["MAG_R"])
    lost = shallow["MAG_G"][50:] == 99.0  # draws past the 23.0 limit (or negative) become non-detections
    assert lost.any() and (shallow["MAGERR_G"][50:][lost] == 1.0).all()
    assert (shallow["MAG_G"][50:][~lost] <= 23.0).all()
    m5 = depth_from_errors(bench.measured(ds, shallow))  # the depth the benchmark tells the models
    assert abs(m5["MAG_G"] - 21.0) < 1e-3 and abs(m5["MAG_R"] - 22.0) < 1e-3
    two = depth_from_errors(bench.measured(ds, copies["twodepth"]))  # between the two halves' depths
    assert 21.0 - 0.3 - 1e-3 <= two["MAG_G"] <= 21.0 + 0.3 + 1e-3
    assert depth_from_errors(bench.measured(ds, copies["deep"]))["MAG_R"] == pytest.approx(24.0, abs=1e-3)


def test_depth_benchmark_seed_summary_needs_every_seed(benchmark_module):
    bench = benchmark_module("depth_augment")
    row = lambda v: {m: v for m in bench.SUMMARY}  # noqa: E731
    metrics = {"nnc_s42": row(1.0), "nnc_s1": row(3.0), "lstm_s42": row(2.0), "nnc_degraded_s42": row(5.0)}
    out = bench.seed_summary(metrics, [42, 1])
    assert set(out) == {"nnc"}  # lstm lacks seed 1; the degraded rows are single-seed
    assert out["nnc"]["pit_ks"] == (2.0, 1.0)


def test_depth_benchmark_before_rows_and_the_switch_that_makes_them(benchmark_module):
    import rail.estimation.algos.deepz_lstm as lstm
    import rail.estimation.algos.deepz_nnc as nnc
    from rail.deepz.augment import validation_at_depth

    bench = benchmark_module("depth_augment")
    rows = bench.rows_to_run([42, 1], {"MAG_I": 20.0}, ("nnc",), before=True, pattern="_depth")
    assert [r[0] for r in rows] == ["nnc_depth_s42", "nnc_depth_before_s42", "nnc_depth_s1", "nnc_depth_before_s1"]
    assert all(r[2]["augment_depth"] == {"MAG_I": 20.0} for r in rows)
    assert len(bench.rows_to_run([42], {"MAG_I": 20.0}, ("nnc",))) == 3 + 1 + 2  # variants, degraded, FlexZBoost
    cfg = {"augment_depth": {"a": 20.0}, "seed": 0}
    with bench.validation_at_training_depth():
        assert nnc.validation_at_depth(cfg, {}, None, None, None) is None
        assert lstm.validation_at_depth(cfg, {}, None, None, None) is None
    assert nnc.validation_at_depth is validation_at_depth and lstm.validation_at_depth is validation_at_depth
