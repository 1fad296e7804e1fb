"""The metrics' direct paths (qp.hist, qp.interp, qp.mixmod read and evaluated from their
stored parameters) against qp's general path, and the harness's handling of rows that
cannot be scored (non-finite PDFs and truths), of ids, and of small or degenerate bins.

Tolerances, and why:

* densities on the metric grids, CDE and Brier terms: rtol 1e-10 -- the same formulas as
  qp (its bin lookup, linear interpolation, the mixture sum), after the same normalisation;
  only the order of float64 operations differs (~1e-16 relative per value). Mixtures are
  evaluated in float32 by default (``MetricConfig.mixture_float32``): rtol 1e-5, from
  float32 rounding of (z - mu) / sigma (~1e-7 relative, times |t| <~ 10 in the exponent).
* PIT: atol 1e-12 -- qp's CDF of a hist/interp is linear between the nodes, as ours. For
  ``interp`` this holds when the PDF vanishes at the first node: qp's CDF starts at
  0.5 y_0 (x_1 - x_0), ours at 0 (checked separately, to the exact amount).
* CRPS: atol 1e-10 against qp's CDF tabulated on a grid that holds every node (where the
  linear-CDF integral is exact); against qp's general path (a 1e-3 grid that need not hold
  uneven bin edges) atol 1e-5: linear interpolation of a piecewise-linear CDF on a grid of
  step h errs by < h x (largest density) only in the cells holding a node, so by
  O(h^2 x density x nodes) ~ 1e-6 in the integral here. Mixtures: closed form against
  qp's gridded CDF, atol 1e-5 (grid step 1e-3, trapezoid error).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import qp
from scipy.special import ndtr

from rail.deepz import gmm
from rail.deepz import pointmetrics as pm
from rail.deepz.gmm import PAIR_BLOCK_ELEMENTS, pair_blocks
from rail.evaluation import deepz_metrics as dm
from rail.evaluation import deepz_mixsums
from rail.evaluation.deepz_mixsums import _mass_between

N = 300


def _hist(rng, n=N):
    # uneven bins reaching outside the metric grid [0, 3]
    bins = np.sort(np.concatenate([[-0.3, 3.6], rng.uniform(-0.3, 3.6, 60)]))
    return qp.Ensemble(qp.hist, data=dict(bins=bins, pdfs=rng.gamma(0.5, 1.0, (n, bins.size - 1))))


def _interp(rng, n=N, y0=0.0):
    x = np.linspace(-0.2, 3.4, 181)
    y = rng.gamma(0.5, 1.0, (n, x.size))
    y[:, 0] = y0
    return qp.Ensemble(qp.interp, data=dict(xvals=x, yvals=y))


def _mixmod(rng, n=N):
    w = rng.dirichlet(np.ones(4), n)
    return qp.Ensemble(qp.mixmod, data=dict(weights=w, means=rng.uniform(-0.2, 3.3, (n, 4)),
                                            stds=rng.uniform(0.02, 0.4, (n, 4))))


MAKERS = {"hist": _hist, "interp": _interp, "mixmod": _mixmod}


def _truth(rng, n=N):
    return rng.uniform(-0.5, 4.0, n)  # some outside the grids and the PDFs' support


def _qp_block(ens):
    """The same PDFs forced through qp's general path (the reference)."""
    return dm.PDFBlock("qp", ens.npdf, ens=ens, bad=np.zeros(ens.npdf, dtype=bool))


@pytest.mark.parametrize("kind", list(MAKERS))
def test_direct_path_equals_qp(kind):
    rng = np.random.default_rng(7)
    ens = MAKERS[kind](rng)
    z = _truth(rng)
    cfg = dm.MetricConfig.for_range(0.0, 3.0)
    direct, ref = dm.MetricAccumulator(cfg, per_object=True), dm.MetricAccumulator(cfg, per_object=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        direct.add(ens, z)
        ref.add(_qp_block(ens), z)
    a, b = direct.per_object(), ref.per_object()
    assert dm.PDFBlock.from_ensemble(ens).kind == kind
    # mixtures on the grids in float32 (MetricConfig.mixture_float32): ~1e-6 of the largest density
    rtol = 1e-5 if kind == "mixmod" else 1e-10
    for key in ("cde1", "cde2", "brier"):
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=1e-12, err_msg=key)
    if kind == "mixmod":  # and exactly qp's values in float64
        exact = dm.MetricAccumulator(dm.MetricConfig.for_range(0.0, 3.0, mixture_float32=False), per_object=True)
        exact.add(ens, z)
        for key in ("cde1", "cde2", "brier"):
            np.testing.assert_allclose(exact.per_object()[key], b[key], rtol=1e-10, atol=1e-12, err_msg=key)
    else:
        np.testing.assert_array_equal(a["zphot"], b["zphot"])  # mode on zgrid: same argmax
    np.testing.assert_allclose(a["pit"], b["pit"], rtol=0, atol=1e-12)
    # PITs of exactly 0 and 1 as qp's (its PIT statistics drop them), so its statistics agree
    for edge in (0.0, 1.0):
        assert (a["pit"] == edge).sum() == (b["pit"] == edge).sum()
        assert kind == "mixmod" or (a["pit"] == edge).sum() > 0  # ztrue outside the tabulated support
    for key, val in dm.pit_metrics(b["pit"]).items():
        assert dm.pit_metrics(a["pit"])[key] == pytest.approx(val, rel=1e-6, abs=1e-12), key
    if kind == "mixmod":  # qp's path integrates over the metric grid only: widen it to the mixtures' support
        b["crps"] = dm.crps_qp(ens, z, limits=(-2.5, 5.5), npts=8001)
    np.testing.assert_allclose(a["crps"], b["crps"], rtol=0, atol=1e-5)
    assert not a["bad_pdf"].any() and not a["bad_truth"].any()
    if kind != "mixmod":  # exact reference: qp's CDF on a grid holding every node
        block = dm.PDFBlock.from_ensemble(ens)
        g = np.union1d(np.linspace(block.x[0], block.x[-1], 2001), block.x)
        exact = dm.crps_grid(np.asarray(ens.cdf(g)), g, z)
        np.testing.assert_allclose(a["crps"], exact, rtol=0, atol=1e-10)


def test_interp_cdf_differs_from_qp_only_by_its_first_node_offset():
    rng = np.random.default_rng(3)
    ens = _interp(rng, 50, y0=2.0)
    x = ens.metadata["xvals"].ravel()
    y0 = ens.objdata["yvals"][:, 0]  # normalised by qp
    z = np.concatenate([rng.uniform(x[0], x[1], 25), rng.uniform(x[1], x[-1], 25)])
    ours = dm.PDFBlock.from_ensemble(ens).cdf_at(z)
    theirs = dm.pit_values(ens, z)
    t = np.clip((z - x[0]) / (x[1] - x[0]), 0, 1)
    offset = np.where(z < x[1], (1 - t) * 0.5 * y0 * (x[1] - x[0]), 0.0)
    np.testing.assert_allclose(theirs - ours, offset, atol=1e-12)


@pytest.mark.parametrize("kind", list(MAKERS))
def test_file_read_with_h5py_equals_ensemble(kind, tmp_path):
    rng = np.random.default_rng(11)
    ens = MAKERS[kind](rng, 500)
    ens.set_ancil({"zmode": rng.uniform(0, 3, 500)})
    path = tmp_path / f"{kind}.hdf5"
    ens.write_to(str(path))
    z = _truth(rng, 500)
    cfg = dm.MetricConfig.for_range(0.0, 3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = dm.accumulate_estimate(str(path), z, config=cfg, chunk_size=123, per_object=True).per_object()
        b = dm.accumulate_estimate(ens, z, config=cfg, chunk_size=10_000, per_object=True).per_object()
    for key in dm.PER_OBJECT_KEYS:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-12, atol=1e-14, err_msg=key)


def test_other_representations_use_qp(tmp_path):
    rng = np.random.default_rng(2)
    quants = np.linspace(0.01, 0.99, 15)
    locs = np.sort(rng.uniform(0.2, 2.5, (40, 15)), axis=1)
    ens = qp.Ensemble(qp.quant, data=dict(quants=quants, locs=locs))
    path = tmp_path / "quant.hdf5"
    ens.write_to(str(path))
    z = rng.uniform(0.2, 2.5, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        po = dm.accumulate_estimate(str(path), z, config=dm.MetricConfig.for_range(0.0, 3.0), per_object=True).per_object()
        ref = dm.pit_values(ens, z)
    np.testing.assert_allclose(po["pit"], ref, atol=1e-12)
    assert np.isfinite(po["crps"]).all()


# ----------------------------------------------------------------- rows that cannot be scored


def _nan_case(tmp_path, n=400, n_bad=10):
    """400 mixtures whose zmode is a good estimate; 10 of them NaN PDFs with a finite zmode."""
    rng = np.random.default_rng(5)
    z = rng.uniform(0.1, 2.5, n)
    w = np.ones((n, 1))
    mu = (z + rng.normal(0, 0.02, n))[:, None]
    s = np.full((n, 1), 0.05)
    bad = rng.choice(n, n_bad, replace=False)
    mu[bad] = np.nan  # as a NaN network output gives
    ens = qp.Ensemble(qp.mixmod, data=dict(weights=w, means=mu, stds=s))
    zmode = mu[:, 0].copy()
    zmode[bad] = 0.015  # the finite zmode NNC gave a NaN PDF
    ens.set_ancil({"zmode": zmode})
    path = tmp_path / "nan.hdf5"
    ens.write_to(str(path))
    return path, z, np.sort(bad)


def test_nan_pdfs_raise_by_default_and_are_counted_when_excluded(tmp_path):
    from rail.evaluation.deepz_compare import compare

    path, z, bad = _nan_case(tmp_path)
    with pytest.raises(ValueError, match=r"10 PDFs or point estimates are not finite \(rows " + str(bad[0])):
        dm.accumulate_estimate(str(path), z)
    with pytest.raises(ValueError, match="exclude"):
        compare({"nnc": path}, {"redshift": z}, outdir=tmp_path / "o1", plots=False, progress=False,
                print_table=False)
    res = compare({"nnc": path}, {"redshift": z}, outdir=tmp_path / "o2", plots=False, progress=False,
                  print_table=False, exclude_bad=True)
    t = res.table[res.table.bin_type == "all"].set_index("metric")
    assert t.loc["n_bad_pdf", "value"] == 10 and t.loc["n_bad_truth", "value"] == 0
    assert t.loc["eta", "n"] == 390  # the metrics are of the 390 good rows, and say so
    good = np.setdiff1d(np.arange(400), bad)
    po = dm.accumulate_estimate(str(path), z, exclude_bad=True, per_object=True).per_object()
    assert np.isnan(po["pit"][bad]).all() and np.isnan(po["zphot"][bad]).all()
    assert t.loc["rail_outlier_rate", "value"] == pytest.approx(
        dm.rail_point_metrics(po["zphot"][good], z[good])["rail_outlier_rate"])
    assert (tmp_path / "o2" / "metrics.csv").is_file()


def test_cli_exclude_bad(tmp_path, capsys):
    import h5py
    import pandas as pd

    from rail.evaluation import deepz_cli

    path, z, bad = _nan_case(tmp_path)
    truth = tmp_path / "truth.hdf5"
    with h5py.File(truth, "w") as f:
        f["redshift"] = z
    args = ["--truth", str(truth), "--estimate", f"nnc={path}", "--no-plots", "--quiet"]
    assert deepz_cli.main(args + ["--out", str(tmp_path / "a")]) == 1
    assert "10 PDFs or point estimates are not finite" in capsys.readouterr().err
    assert deepz_cli.main(args + ["--out", str(tmp_path / "b"), "--exclude-bad"]) == 0
    t = pd.read_csv(tmp_path / "b" / "metrics.csv")
    assert t[(t.metric == "n_bad_pdf") & (t.bin_type == "all")].value.item() == 10


def test_nan_truths_raise_by_default_and_are_counted_when_excluded(tmp_path):
    rng = np.random.default_rng(1)
    ens = _mixmod(rng, 200)
    z = rng.uniform(0.1, 2.5, 200)
    z[[3, 50, 199]] = np.nan
    with pytest.raises(ValueError, match=r"3 true redshifts are not finite \(rows 3, 50, 199\)"):
        dm.accumulate_estimate(ens, z)
    po = dm.accumulate_estimate(ens, z, exclude_bad=True, per_object=True).per_object()
    rows = {r["metric"]: r for r in dm.tidy_metrics(po, "x", np.linspace(0, 3, 4)) if r["bin_type"] == "all"}
    assert rows["n_bad_truth"]["value"] == 3 and rows["crps"]["n"] == 197
    assert np.isfinite(rows["crps"]["value"])


# ----------------------------------------------------------------- ids


def test_truth_in_another_row_order_is_matched_by_id(tmp_path):
    from rail.evaluation.deepz_compare import compare

    rng = np.random.default_rng(9)
    n = 300
    ens = _mixmod(rng, n)
    ids = rng.permutation(10 * n)[:n] + 1000
    ens.set_ancil({"zmode": ens.objdata["means"][:, 0], "id": ids})  # where RAIL's estimators put id_col
    path = tmp_path / "est.hdf5"
    ens.write_to(str(path))
    z = rng.uniform(0.0, 3.0, n)
    mag = rng.uniform(18, 25, n)
    kw = dict(outdir=tmp_path / "o", plots=False, progress=False, print_table=False, mag_col="mag")
    aligned = compare({"a": path}, {"redshift": z, "mag": mag, "object_id": ids}, **kw).table
    perm = rng.permutation(n)
    shuffled = compare({"a": path}, {"redshift": z[perm], "mag": mag[perm], "object_id": ids[perm]}, **kw).table
    np.testing.assert_allclose(shuffled.value.to_numpy(), aligned.value.to_numpy(), rtol=1e-12, equal_nan=True)
    # without ids the shuffled truth gives other numbers: the matching did something
    plain = compare({"a": path}, {"redshift": z[perm], "mag": mag[perm]}, **kw).table
    assert not np.allclose(plain.value.to_numpy(), aligned.value.to_numpy(), equal_nan=True)
    # id sets that disagree: an error naming how many
    other = ids.copy()
    other[:2] = [-1, -2]
    with pytest.raises(ValueError, match="2 of its 300 ids are not in the truth table.*2 of the 300 truth ids"):
        compare({"a": path}, {"redshift": z, "mag": mag, "object_id": other}, id_col="object_id", **kw)


def test_align_to_truth():
    assert dm.align_to_truth([1, 2, 3], [1, 2, 3]) is None
    np.testing.assert_array_equal(dm.align_to_truth([3, 1, 2], [1, 2, 3]), [2, 0, 1])
    np.testing.assert_array_equal(dm.align_to_truth([b"b", b"a"], np.array(["a", "b"])), [1, 0])
    with pytest.raises(ValueError, match="repeat"):
        dm.align_to_truth([1, 1, 2], [1, 2, 3])


# ----------------------------------------------------------------- small and degenerate bins


def test_degenerate_and_small_bins_are_nan_not_a_crash():
    rng = np.random.default_rng(0)
    n = 200
    z = np.concatenate([rng.uniform(0.0, 1.0, n), rng.uniform(1.0, 2.0, 15), rng.uniform(2.0, 3.0, 3)])
    m = z.size
    po = {"ztrue": z, "zphot": z + rng.normal(0, 0.02, m), "pit": rng.uniform(0, 1, m),
          "crps": rng.uniform(0, 0.1, m), "cde1": np.ones(m), "cde2": np.ones(m), "brier": np.ones(m),
          "mag": np.full(m, np.nan), "bad_pdf": np.zeros(m, bool), "bad_truth": np.zeros(m, bool)}
    po["pit"][n:n + 15] = 1.0  # every PIT of this bin at 1: qp's PIT class cannot be built
    with pytest.raises(Exception):
        dm.pit_metrics_qp(po["pit"][n:n + 15])
    with pytest.warns(dm.MetricWarning) as rec:
        rows = dm.tidy_metrics(po, "x", np.array([0.0, 1.0, 2.0, 3.0]))
    msgs = " ".join(str(r.message) for r in rec)
    assert "3 objects, fewer than 10" in msgs
    by = {(r["bin_lo"], r["metric"]): r for r in rows if r["bin_type"] == "redshift"}
    # the statistics themselves are defined: KS of 15 PITs at 1 against U(0, 1) is 1
    assert by[(1.0, "pit_ks")]["value"] == 1.0 and by[(1.0, "pit_ks")]["n"] == 15
    assert np.isfinite(by[(1.0, "pit_cvm")]["value"]) and np.isfinite(by[(1.0, "pit_ad")]["value"])
    assert np.isfinite(by[(1.0, "sigma_nmad")]["value"]) and by[(1.0, "pco")]["value"] == 1.0
    assert all(np.isnan(by[(2.0, k)]["value"]) and by[(2.0, k)]["n"] == 3 for k in dm.METRIC_INFO)
    assert all(np.isfinite(by[(0.0, k)]["value"]) for k in dm.METRIC_INFO)


def test_som_uses_the_one_home_of_the_point_metrics():
    from rail.deepz import som

    rng = np.random.default_rng(3)
    zt = rng.uniform(0, 3, 500)
    zp = zt + rng.normal(0.01, 0.05, 500) * (1 + zt)
    pit = rng.uniform(0, 1, 500)
    dz, outl, pco_i = som.residual_terms(zp, zt, pit)
    g = som.global_metrics(dz, outl, pco_i)
    assert g["sigma_nmad"] == pm.sigma_nmad_nomedian(zp, zt)  # the SOM paper's definition
    assert g["eta"] == pm.eta(zp, zt) and g["pco"] == pm.pco(pit) and g["bias"] == pm.bias_median(zp, zt)


def test_row_cumsum_is_numpys():
    m = np.random.default_rng(0).random((37, 211))
    ref = np.cumsum(m, axis=1)
    out = dm._cumsum_rows(m)  # in place
    assert out is m
    np.testing.assert_array_equal(out, ref)


def test_point_estimates_computed_when_not_in_the_ancil():
    rng = np.random.default_rng(4)
    ens = _hist(rng, 40)
    z = rng.uniform(0.0, 3.0, 40)
    for key, ref in (("zmode", lambda: ens.mode(grid=np.linspace(0.0, 3.0, 301))), ("zmedian", ens.median)):
        acc = dm.MetricAccumulator(dm.MetricConfig.for_range(0.0, 3.0, point_estimate=key), per_object=True)
        acc.add(ens, z)
        np.testing.assert_allclose(acc.per_object()["zphot"], np.asarray(ref()).ravel(), rtol=1e-12)
    with pytest.raises(KeyError, match="zfoo"):
        dm.MetricAccumulator(dm.MetricConfig(point_estimate="zfoo")).add(ens, z)


def test_pit_outlier_rate_is_the_fraction_of_extreme_pits():
    """qp reads the outlier rate off a quantile fit of the PITs, which is not a fraction when many PITs sit
    at exactly 0 or 1 (kNN's finite-support PDFs on VVDS-deep gave 3.5e15); ours counts them."""
    from rail.evaluation.deepz_metrics import pit_metrics

    rng = np.random.default_rng(3)
    pit = np.concatenate([rng.uniform(0, 1, 900), np.zeros(60), np.ones(40)])
    rate = pit_metrics(pit)["pit_outlier_rate"]
    assert rate == pytest.approx(100 / 1000 + np.mean((pit[:900] < 1e-4) | (pit[:900] > 0.9999)))
    assert 0.0 <= rate <= 1.0


@pytest.mark.parametrize("pair_elements", [None, 64])
def test_mixture_closed_form_sums_equal_the_grid_sums(pair_elements, monkeypatch):
    """CDE and Brier terms of mixtures from the closed forms (``deepz_mixsums``: exact integral
    plus Euler-Maclaurin end terms) against the tabulated float64 sums: rtol 1e-7 (the next
    end term, ~1e-8 relative at widths of two grid steps, far less for wider components).
    Rows with a component narrower than two steps go through the grid (equal to 1e-12).
    ``pair_elements`` = 64: rows cut into pair blocks of 16 (``pair_blocks``), the same values."""
    rng = np.random.default_rng(5)
    n, k = 400, 6
    if pair_elements:
        monkeypatch.setattr(gmm, "PAIR_BLOCK_ELEMENTS", pair_elements)
        assert len(pair_blocks(np.arange(n), k)) == 25
    w = rng.dirichlet(np.ones(k), n)
    mu = rng.uniform(-0.3, 3.3, (n, k))  # some components centred outside the grids
    s = rng.uniform(0.02, 0.5, (n, k))
    s[:40, 0] = 0.003  # narrower than the grid step: tabulated
    ens = qp.Ensemble(qp.mixmod, data=dict(weights=w, means=mu, stds=s))
    ens.set_ancil({"zmode": mu[:, 0]})
    z = _truth(rng, n)
    cfg = dm.MetricConfig.for_range(0.0, 3.0, mixture_float32=False)
    closed = dm.MetricAccumulator(cfg, per_object=True)
    grid = dm.MetricAccumulator(dm.MetricConfig.for_range(0.0, 3.0, mixture_float32=False, mixture_closed_form=False),
                                per_object=True)
    closed.add(ens, z)
    grid.add(ens, z)
    a, b = closed.per_object(), grid.per_object()
    assert closed._closed_form(dm.PDFBlock.from_ensemble(ens))
    for key in ("cde1", "cde2", "brier"):
        np.testing.assert_allclose(a[key][40:], b[key][40:], rtol=1e-7, atol=1e-12, err_msg=key)
        np.testing.assert_allclose(a[key][:40], b[key][:40], rtol=1e-12, atol=1e-12, err_msg=key)
    np.testing.assert_allclose(a["crps"], b["crps"], rtol=0, atol=1e-12)  # the same closed form, pairs once
    np.testing.assert_array_equal(a["pit"], b["pit"])
    if pair_elements:  # the cut into pair blocks changes no value
        monkeypatch.setattr(gmm, "PAIR_BLOCK_ELEMENTS", 1 << 16)
        one = dm.MetricAccumulator(cfg, per_object=True)
        one.add(ens, z)
        for key in ("cde1", "cde2", "brier", "crps"):
            np.testing.assert_array_equal(a[key], one.per_object()[key], err_msg=key)
    # a grid that is not evenly spaced: tabulated
    uneven = dm.MetricConfig(zgrid=np.sort(np.r_[0.0, 3.0, rng.uniform(0, 3, 299)]))
    assert not dm.MetricAccumulator(uneven)._closed_form(dm.PDFBlock.from_ensemble(ens))


def test_narrow_mixtures_inside_the_grid_take_the_closed_form_with_aliasing():
    """Components narrower than two grid steps alias on the grid; far enough inside it (and
    >= ``_ALIAS_MIN_STEPS`` steps wide) their lattice sums are the integral plus the aliasing
    terms (Poisson summation): equal to the tabulated float64 sums to 1e-11 relative, where the
    aliasing itself is up to tens of percent of the sum. Narrower or edge-hugging rows are
    tabulated."""
    rng = np.random.default_rng(1)
    n, k = 600, 5
    w = rng.dirichlet(np.ones(k), n)
    mu = rng.uniform(0.3, 2.7, (n, k))
    s = np.exp(rng.uniform(np.log(0.003), np.log(0.05), (n, k)))  # 0.3 .. 5 grid steps
    mu[:30, 1] = rng.uniform(0.0, 0.05, 30)  # a narrow-ish component at the grid's start
    ens = qp.Ensemble(qp.mixmod, data=dict(weights=w, means=mu, stds=s))
    ens.set_ancil({"zmode": mu[:, 0]})
    z = _truth(rng, n)
    closed = dm.MetricAccumulator(dm.MetricConfig.for_range(0.0, 3.0, mixture_float32=False), per_object=True)
    grid = dm.MetricAccumulator(dm.MetricConfig.for_range(0.0, 3.0, mixture_float32=False, mixture_closed_form=False),
                                per_object=True)
    closed.add(ens, z)
    grid.add(ens, z)
    a, b = closed.per_object(), grid.per_object()
    pairs = deepz_mixsums.MixtureSquares(w, mu, s)
    good = pairs.closed_form_ok(((0.0, 3.0), (0.0, 3.0)), max(closed._steps))
    sq_width = s[:30, 1] / np.sqrt(2.0)  # the width of the component's square in p^2
    hugging = (sq_width < np.sqrt(2.0) * max(closed._steps)) & (mu[:30, 1] < 11.0 * sq_width)
    assert 0.3 < good.mean() < 0.95 and hugging.any() and not good[:30][hugging].any()
    alias = np.abs(pairs.aliasing(0.0, closed._steps[0])) / pairs.sq_integral(0.0, 3.0)
    assert alias[good].max() > 0.05  # the aliasing matters: without it these rows would be wrong
    for key in ("cde1", "brier"):  # rows 30+: every component far inside; rows < 30: the end terms' 1e-7
        np.testing.assert_allclose(a[key][30:], b[key][30:], rtol=1e-11, atol=0, err_msg=key)
        np.testing.assert_allclose(a[key][:30], b[key][:30], rtol=1e-7, atol=0, err_msg=key)
    np.testing.assert_allclose(a["cde2"], b["cde2"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a["crps"], b["crps"], rtol=0, atol=1e-12)


def test_mass_between_equals_ndtr_differences():
    """``_mass_between`` skips ndtr where both ends are > _TAIL widths away, and one ndtr where
    one end is: the same masses as ndtr(b) - ndtr(a) everywhere to float64 rounding
    (Phi(-8.3) < 6e-17), tails included."""
    rng = np.random.default_rng(11)
    m = rng.uniform(-2.0, 5.0, (300, 17))
    s = np.exp(rng.uniform(np.log(1e-3), np.log(2.0), m.shape))
    m[0, :5] = [0.0 + 8.3 * s[0, 0], 3.0 - 8.3 * s[0, 1], 1.5, -50.0, 60.0]  # at the threshold, far outside
    got = _mass_between(0.0, 3.0, m, s)
    ref = ndtr((3.0 - m) / s) - ndtr((0.0 - m) / s)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2.3e-16)  # one end: Phi(-a) vs 1 - Phi(a), a rounding apart
    assert got.shape == m.shape and (got == 1.0).mean() > 0.2  # the shortcut was taken


def test_pair_blocks_cover_the_rows_in_order():
    rows = np.flatnonzero(np.random.default_rng(2).random(5000) < 0.7)
    for k in (1, 2, 15, 45, 400):
        blocks = pair_blocks(rows, k)
        np.testing.assert_array_equal(np.concatenate(blocks) if blocks else rows[:0], rows)
        assert all(b.size >= 16 for b in blocks[:-1])
        assert max(b.size for b in blocks) * max(1, k * (k - 1) // 2) <= max(PAIR_BLOCK_ELEMENTS, 16 * k * k)
    assert pair_blocks(rows[:0], 15) == []


@pytest.mark.parametrize("case", ["smooth", "zeros_ones_ties", "tiny"])
@pytest.mark.parametrize("chunk", [37, 1 << 18])
def test_pit_statistics_equal_qps(case, chunk, monkeypatch):
    monkeypatch.setattr(dm, "_STAT_CHUNK", chunk)  # 37: many slices, ties across slice ends
    rng = np.random.default_rng(8)
    pit = rng.beta(0.7, 1.3, 5000)
    if case == "zeros_ones_ties":
        pit[rng.random(pit.size) < 0.05] = 0.0
        pit[rng.random(pit.size) < 0.05] = 1.0
        pit = np.round(pit, 3)
    elif case == "tiny":
        pit = pit[:12]
    ours, ref = dm.pit_metrics(pit), dm.pit_metrics_qp(pit)
    for key in dm.PIT_KEYS:
        assert ours[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key


def test_local_maxima_count_hand_cases():
    """Comb measure: a point or flat-top maximum counts once if it dips >= 10% on both sides; the top always counts."""
    cases = [
        ([0, 1, 0, 1, 0], 2),  # two separate peaks
        ([1, 2, 2, 3, 1], 1),  # a flat step on the way up is not a peak
        ([0, 0, 1, 1, 0], 1),  # a flat top is one peak
        ([0, 1, 0.95, 1, 0], 1),  # a 5% dip does not split a peak
        ([0, 1, 0.5, 0.6, 0.1], 2),  # a 17% dip does
        ([3, 2, 1, 0, 0], 1),  # a mode at the end of the grid
        ([0, 1, 0, 0.005, 0], 1),  # a bump below 1% of the peak does not count
        ([0, 0, 0, 0, 0], 0),
        ([np.nan, 1, 0, 1, 0], 0),
    ]
    got = [int(dm.local_maxima_count(np.array([row], dtype=float))[0]) for row, _ in cases]
    assert got == [n for _, n in cases]
    # rows are independent: the same answers in one call
    np.testing.assert_array_equal(dm.local_maxima_count(np.array([r for r, _ in cases], dtype=float)), got)
    with pytest.raises(ValueError, match="grid of >= 3 points"):
        dm.local_maxima_count(np.ones((2, 2)))


def test_local_maxima_count_smooth_and_comb():
    z = np.linspace(0.0, 3.0, 3001)
    smooth = np.exp(-0.5 * ((z - 1.0) / 0.05) ** 2) + 0.5 * np.exp(-0.5 * ((z - 2.0) / 0.1) ** 2)
    comb = smooth * (1.0 + 0.9 * np.cos(2 * np.pi * z / 0.015))  # teeth 0.015 apart
    n_smooth, n_comb = dm.local_maxima_count(np.stack([smooth, comb]))
    assert n_smooth == 2
    assert n_comb > 40


@pytest.mark.parametrize("kind", ["hist", "interp"])
def test_tabulated_quadratic_sums_equal_the_grid_sums(kind):
    """CDE and Brier terms of hist/interp PDFs as quadratic forms in the stored values
    (``PDFBlock.sq_sums`` / ``at_grid``) against tabulating each PDF on both grids: the same sums
    added in another order, so equal to 1e-10 relative; PIT and CRPS untouched. The PDFs'
    support is uneven and narrower than the metric grids (grid points outside give 0), and a
    row that cannot be normalised stays NaN."""
    rng = np.random.default_rng(11)
    n = 300
    x = np.sort(np.r_[0.1, 2.8, rng.uniform(0.1, 2.8, 120)])  # uneven nodes / edges inside [0, 3]
    m = x.size - 1 if kind == "hist" else x.size
    y = rng.gamma(0.5, 1.0, (n, m))
    y[3] = np.nan
    data = dict(bins=x, pdfs=y) if kind == "hist" else dict(xvals=x, yvals=y)
    ens = qp.Ensemble(qp.hist if kind == "hist" else qp.interp, data=data)
    ens.set_ancil({"zmode": rng.uniform(0, 3, n)})
    z = _truth(rng, n)
    z[:5] = [0.0, 3.0, 0.05, 2.95, x[7]]  # grid ends, outside the support, on a node
    quad = dm.MetricAccumulator(dm.MetricConfig.for_range(0.0, 3.0), per_object=True)
    grid = dm.MetricAccumulator(dm.MetricConfig.for_range(0.0, 3.0, tabulated_quadratic=False), per_object=True)
    quad.add(ens, z)
    grid.add(ens, z)
    assert quad._quadratic(dm.PDFBlock.from_ensemble(ens)) and not grid._quadratic(dm.PDFBlock.from_ensemble(ens))
    a, b = quad.per_object(), grid.per_object()
    assert np.isnan(a["cde1"][3]) and np.isnan(a["brier"][3])
    for key in ("cde1", "cde2", "brier"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-10, atol=1e-12, err_msg=key)
    for key in ("pit", "crps", "zphot"):
        np.testing.assert_array_equal(a[key], b[key])
