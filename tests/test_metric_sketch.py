"""The bounded-memory summaries of the metric pass (rail.evaluation.deepz_sketch) against the exact
numpy / scipy / qp computation on the per-object values, and their memory.

Tolerances (the bounds of deepz_sketch's docstring, with the margins measured here):
point-metric quantiles (sigma_NMAD, bias_median, sigma_IQR) 2e-4 relative (one dz bin);
RAIL outlier rate 1e-4 absolute; PIT KS 1/2^16 absolute; CvM 1e-4 relative; AD 1e-3 relative
+ 1e-3 absolute; sums and fixed-threshold counts (eta, PCO, PIT outliers, CRPS, CDE, Brier,
bias_mean, inlier mean/std) 1e-12 relative.
"""

import tracemalloc
import warnings

import numpy as np
import pytest

from rail.evaluation import deepz_metrics as dm
from rail.evaluation.deepz_sketch import PIT_BINS, PITSketch, ResidualSketch, SortedRuns

EXACT = ("eta", "bias_mean", "bias_inlier_mean", "sigma_inlier_std", "crps", "pco", "pit_outlier_rate",
         "cde_loss", "brier")
QUANTILE = ("sigma_nmad", "sigma_nmad_nomedian", "bias_median", "rail_sigma_iqr")


def _pits(rng, kind, n):
    if kind == "uniform":
        return rng.random(n)
    if kind == "skewed":  # over-confident PDFs: PITs piled towards both ends
        return rng.beta(0.5, 0.7, n)
    if kind == "piled":  # finite-support PDFs: many PITs exactly 0 or 1, a spike inside
        p = rng.beta(2.0, 2.0, n)
        u = rng.random(n)
        return np.where(u < 0.1, 0.0, np.where(u < 0.17, 1.0, np.where(u < 0.2, 0.25, p)))
    if kind == "narrow":  # nearly all PITs in one fine PIT bin
        return 0.5 + 1e-6 * rng.random(n)
    raise ValueError(kind)


def _objects(rng, n, pit_kind, tails):
    zt = rng.uniform(0.0, 3.0, n)
    core = 0.03 * rng.standard_normal(n) + 0.002
    if tails == "cauchy":  # heavy outlier tails
        dz = np.where(rng.random(n) < 0.1, 0.5 * rng.standard_cauchy(n), core)
    elif tails == "lognormal":  # one-sided
        dz = np.where(rng.random(n) < 0.2, rng.lognormal(-2.0, 1.0, n), core)
    else:
        dz = core
    return dict(ztrue=zt, zphot=zt + dz * (1.0 + zt), pit=_pits(rng, pit_kind, n), crps=rng.gamma(2.0, 0.05, n),
                cde1=rng.gamma(3.0, 1.0, n), cde2=rng.gamma(2.0, 1.0, n), brier=rng.gamma(2.0, 0.3, n))


def _sketched(po):
    g = dm.GroupSummary()
    for s in range(0, len(po["ztrue"]), 7_777):  # block by block, as the pass adds them
        g.add({k: v[s:s + 7_777] for k, v in po.items()})
    return g


@pytest.mark.parametrize("pit_kind,tails", [("uniform", "none"), ("skewed", "cauchy"), ("piled", "lognormal"),
                                            ("narrow", "cauchy")])
def test_summary_metrics_equal_the_exact_ones_within_the_bounds(pit_kind, tails):
    rng = np.random.default_rng(7)
    po = _objects(rng, 120_000, pit_kind, tails)
    exact = dm.summarize_group(po)
    sk = _sketched(po).metrics()
    for k in EXACT:
        assert sk[k] == pytest.approx(exact[k], rel=1e-12, abs=1e-15), k
    for k in QUANTILE:
        assert sk[k] == pytest.approx(exact[k], rel=2e-4, abs=1e-8), k
    assert abs(sk["rail_outlier_rate"] - exact["rail_outlier_rate"]) <= 1e-4
    assert abs(sk["pit_ks"] - exact["pit_ks"]) <= 1.0 / PIT_BINS
    assert sk["pit_cvm"] == pytest.approx(exact["pit_cvm"], rel=1e-4)
    assert sk["pit_ad"] == pytest.approx(exact["pit_ad"], rel=1e-3, abs=1e-3)


def test_small_groups_are_exact():
    """Bins holding one or two values (or only equal ones) are reconstructed exactly: a group of
    a few hundred objects gives numpy's and scipy's values up to rounding."""
    rng = np.random.default_rng(3)
    for kind in ("uniform", "piled"):
        po = _objects(rng, 400, kind, "cauchy")
        g = _sketched(po)
        assert np.all((g.pit.count[1:-1] <= 2) | (g.pit.lo[1:-1] == g.pit.hi[1:-1]))
        exact, sk = dm.summarize_group(po), g.metrics()
        for k in exact:
            assert sk[k] == pytest.approx(exact[k], rel=1e-9, abs=1e-12), (kind, k)


def test_sketch_order_statistics_and_counts():
    rng = np.random.default_rng(5)
    x = np.concatenate([0.02 * rng.standard_normal(50_000), 3.0 * rng.standard_cauchy(5_000), [0.0] * 300, [40.0, -55.0]])
    sk = ResidualSketch()
    sk.add(x[: x.size // 2])
    other = ResidualSketch()
    other.add(x[x.size // 2:])
    sk.merge(other)
    assert sk.n == x.size
    xs = np.sort(x)
    inside = np.flatnonzero(np.abs(xs) < 20.0)  # beyond |dz| = DZ_RANGE one overflow bin each side
    r = np.array([inside[0], inside[1], inside[100], x.size // 2, inside[-2], inside[-1]])
    np.testing.assert_allclose(sk.value_at(r), xs[r], rtol=2e-4, atol=1e-8)
    assert sk.value_at(np.array([0, x.size - 1])).tolist() == [xs[0], xs[-1]]  # the extremes are kept
    for v in (-0.05, 0.0, 0.01, 0.15, 19.0):
        assert abs(int(sk.count_le(v)) - int(np.sum(x <= v))) <= max(1, 2e-4 * x.size), v
    np.testing.assert_allclose(sk.percentile([25.0, 75.0]), np.percentile(x, [25.0, 75.0]), rtol=2e-4)
    med = np.median(x)
    assert sk.abs_dev_median(sk.median()) == pytest.approx(np.median(np.abs(x - med)), rel=2e-4)


def test_pit_statistics_of_the_sketch_stream_in_slices():
    """The streamed statistics do not depend on the slice length (ties at 0 and 1 included)."""
    rng = np.random.default_rng(11)
    pit = _pits(rng, "piled", 30_000)
    sk = PITSketch()
    sk.add(pit)
    whole = dm.pit_statistics_runs(sk)
    sliced = dm.pit_statistics_runs(sk, chunk=37)
    for k in whole:
        assert sliced[k] == pytest.approx(whole[k], rel=1e-10), k
    exact = dm.pit_statistics_runs(SortedRuns(pit), chunk=37)
    assert exact == pytest.approx(dm.pit_statistics(pit), rel=1e-10)


def test_degenerate_pits_are_nan_with_a_warning_not_a_crash():
    po = _objects(np.random.default_rng(2), 50, "uniform", "none")
    po["pit"] = np.full(50, 2.0)  # no PIT in [0, 1]: scipy's AD has no sample
    with pytest.warns(dm.MetricWarning, match="PIT statistics"):
        out = _sketched(po).metrics("x")
    assert np.isnan(out["pit_ad"]) and np.isfinite(out["crps"])
    po["pit"] = np.where(np.arange(50) == 3, np.nan, 0.5)  # a NaN PIT is never left out silently
    with pytest.warns(dm.MetricWarning, match="PIT values are NaN"):
        out = _sketched(po).metrics("x")
    assert np.isnan(out["pit_ks"]) and np.isnan(out["pit_ad"])


def _state_growth(n_small, n_large, chunk=5_000):
    """Peak traced memory of filling MetricGroups with n objects (in chunks made beforehand)."""
    rng = np.random.default_rng(0)
    po = _objects(rng, n_large, "skewed", "cauchy")
    po["mag"] = rng.uniform(18, 26, n_large)
    edges = np.linspace(0, 3, 7), np.arange(18.0, 27.0)
    peaks, sizes = [], []
    for n in (n_small, n_large):
        chunks = [{k: v[s:min(s + chunk, n)] for k, v in po.items()} for s in range(0, n, chunk)]
        tracemalloc.start()
        groups = dm.MetricGroups(*edges, zz_range=(0.0, 3.0))
        for c in chunks:
            groups.add(c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groups.tidy("x")
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        sizes.append(groups.nbytes)
    return peaks, sizes


def test_summary_memory_does_not_grow_with_the_number_of_objects(monkeypatch):
    """10x the objects: the same state (bytes) and a peak within 1 MB (the per-object arrays of
    before grew by 66 bytes per object: 5.9 MB here). The PIT statistics stream slices of
    ``_STAT_CHUNK`` runs and rows are summarised in batches of ``MetricGroups.BATCH`` (2^18 and
    2^16 by default: these temporaries grow up to that many objects, then stay); 2^12 here, so
    that 1e4 objects already fill them."""
    monkeypatch.setattr(dm, "_STAT_CHUNK", 1 << 12)
    monkeypatch.setattr(dm.MetricGroups, "BATCH", 1 << 12)  # rows buffered before a summary update
    peaks, sizes = _state_growth(10_000, 100_000)
    assert sizes[0] == sizes[1]
    assert peaks[1] - peaks[0] < 1 << 20, peaks


def test_accumulator_memory_is_flat_and_per_object_is_optional():
    import qp

    rng = np.random.default_rng(1)
    n = 40_000
    mu = rng.uniform(0.1, 2.5, (n, 2))
    ens = qp.Ensemble(qp.mixmod, data=dict(weights=np.full((n, 2), 0.5), means=mu, stds=np.full((n, 2), 0.05)))
    ens.set_ancil({"zmode": mu[:, 0]})
    z = mu[:, 0] + 0.05 * rng.standard_normal(n)
    cfg = dm.MetricConfig.for_range(0.0, 3.0)
    nb = []
    for m in (4_000, n):
        acc = dm.MetricAccumulator(cfg, workers=1, z_edges=np.linspace(0, 3, 7))
        for s in range(0, m, 4_000):
            acc.add(ens[s:s + 4_000], z[s:s + 4_000])
        nb.append(acc.nbytes)
    assert nb[0] == nb[1]
    with pytest.raises(ValueError, match="per_object=True"):
        acc.per_object()
    rows = {(r["bin_type"], r["bin_lo"], r["metric"]): r["value"] for r in acc.tidy("m")}
    keep = dm.MetricAccumulator(cfg, workers=1, per_object=True)
    keep.add(ens, z)
    ref = {(r["bin_type"], r["bin_lo"], r["metric"]): r["value"]
           for r in dm.tidy_metrics(keep.per_object(), "m", np.linspace(0, 3, 7))}
    assert rows.keys() == ref.keys()
    for k in rows:  # the same summaries, filled in other blocks
        assert rows[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12, nan_ok=True), k
