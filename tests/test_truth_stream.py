"""The truth table streamed slice by slice (rail.evaluation.deepz_truth): the same tables as the
whole-array path, memory flat in the number of rows, ids checked chunk by chunk with the
whole-array fallback for estimates in another row order, and the fixed-size summaries it reads
(magnitude-bin edges exact against numpy's percentiles; example rows within one bin)."""

from __future__ import annotations

import tracemalloc

import h5py
import numpy as np
import pytest
import qp

from rail.evaluation import deepz_metrics as dm
from rail.evaluation import deepz_truth as dt
from rail.evaluation.deepz_compare import compare
from rail.evaluation.deepz_sketch import MagnitudeSketch

KW = dict(plots=False, progress=False, print_table=False)


def _hist_file(path, z, rng, ids=None):
    """A qp.hist estimate of 40 bins on [0, 3]: a bump near the true z, zmode in the ancil."""
    bins = np.linspace(0.0, 3.0, 41)
    mid = 0.5 * (bins[1:] + bins[:-1])
    zp = np.clip(z + rng.normal(0, 0.05, z.size), 0.01, 2.99)
    pdfs = np.exp(-0.5 * ((mid[None, :] - zp[:, None]) / 0.1) ** 2) + 1e-3
    ens = qp.Ensemble(qp.hist, data=dict(bins=bins, pdfs=pdfs))
    anc = {"zmode": mid[np.argmax(pdfs, axis=1)]}
    if ids is not None:
        anc["id"] = ids
    ens.set_ancil(anc)
    ens.write_to(str(path))
    return path


def _truth_file(path, z, mag, ids=None, group=None):
    with h5py.File(path, "w") as f:
        g = f.create_group(group) if group else f
        g["redshift"] = z
        g["mag_i"] = mag
        if ids is not None:
            g["object_id"] = ids
    return path


def _case(tmp_path, n=3000, seed=3):
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.05, 2.9, n)
    mag = rng.normal(23.0, 1.2, n)
    mag[:7] = 99.0  # non-detection markers: not in the edges
    ids = rng.permutation(10 * n)[:n] + 5
    est = _hist_file(tmp_path / "est.hdf5", z, rng, ids)
    return z, mag, ids, est


def _values(table):
    return table.value.to_numpy()


def test_streamed_tables_equal_the_whole_array_tables(tmp_path):
    z, mag, ids, est = _case(tmp_path)
    path = _truth_file(tmp_path / "truth.hdf5", z, mag, ids, group="photometry")
    memory = compare({"a": est}, {"redshift": z, "mag_i": mag, "object_id": ids}, mag_col="mag_i",
                     outdir=tmp_path / "m", chunk_size=700, **KW)
    streamed = compare({"a": est}, path, mag_col="mag_i", outdir=tmp_path / "s", chunk_size=700, **KW)
    assert "magnitude" in set(streamed.table.bin_type)
    for col in ("estimator", "bin_type", "metric", "n"):
        assert streamed.table[col].tolist() == memory.table[col].tolist(), col
    np.testing.assert_array_equal(streamed.table.bin_lo.to_numpy(), memory.table.bin_lo.to_numpy())
    np.testing.assert_allclose(_values(streamed.table), _values(memory.table), rtol=1e-12, equal_nan=True)
    # the example objects are the same rows either way
    assert sorted(streamed.example_pdfs["a"]) == sorted(memory.example_pdfs["a"])
    assert len(streamed.example_pdfs["a"]) == 6


def test_misaligned_ids_fall_back_to_the_whole_columns(tmp_path):
    z, mag, ids, est = _case(tmp_path, n=1500)
    aligned = compare({"a": est}, _truth_file(tmp_path / "t0.hdf5", z, mag, ids), mag_col="mag_i",
                      outdir=tmp_path / "o0", **KW).table
    perm = np.random.default_rng(5).permutation(z.size)
    lines = []
    shuffled = compare({"a": est}, _truth_file(tmp_path / "t1.hdf5", z[perm], mag[perm], ids[perm]),
                       mag_col="mag_i", outdir=tmp_path / "o1", plots=False, print_table=False,
                       progress=lines.append).table
    np.testing.assert_allclose(_values(shuffled), _values(aligned), rtol=1e-12, equal_nan=True)
    first = int(np.flatnonzero(ids[perm] != ids)[0])
    assert any(f"ids differ from the truth table's from row {first} on" in m and "into memory" in m
               for m in lines), lines
    other = ids.copy()
    other[[10, 20]] = [-1, -2]
    with pytest.raises(ValueError, match="2 of its 1500 ids are not in the truth table"):
        compare({"a": est}, _truth_file(tmp_path / "t2.hdf5", z, mag, other), mag_col="mag_i",
                outdir=tmp_path / "o2", **KW)
    with pytest.raises(ValueError, match="1500 PDFs but the truth table has 1499 rows"):
        compare({"a": est}, _truth_file(tmp_path / "t3.hdf5", z[:-1], mag[:-1]), mag_col="mag_i",
                outdir=tmp_path / "o3", **KW)
    with pytest.raises(KeyError, match="'mag_x' \\(option mag_col\\)"):
        compare({"a": est}, tmp_path / "t0.hdf5", mag_col="mag_x", outdir=tmp_path / "o4", **KW)


def _peak(tmp_path, n, seed):
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.05, 2.9, n)
    est = _hist_file(tmp_path / f"est{n}.hdf5", z, rng, np.arange(n))
    truth = _truth_file(tmp_path / f"truth{n}.hdf5", z, rng.normal(23, 1, n), np.arange(n))
    compare({"a": est}, truth, mag_col="mag_i", outdir=tmp_path / f"w{n}", chunk_size=10_000, **KW)  # warm
    tracemalloc.start()
    try:
        compare({"a": est}, truth, mag_col="mag_i", outdir=tmp_path / f"o{n}", chunk_size=10_000, **KW)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_compare_peak_memory_is_flat_in_the_number_of_rows(tmp_path, monkeypatch):
    """10x the rows, the same traced peak within 2 MB (the whole-array path held the truth's z, mag
    and ids: 24 B/row, 4.3 MB more at 2e5, and its id comparison copied them). The slices of the
    truth pre-passes, of the PIT statistics and of the summary batches grow up to 2^16, 2^18 and
    2^16 rows and then stay: 2^12 here, so that 2e4 rows already fill them (as
    tests/test_metric_sketch.py does)."""
    monkeypatch.setattr(dt, "SLICE", 1 << 12)
    monkeypatch.setattr(dm, "_STAT_CHUNK", 1 << 12)
    monkeypatch.setattr(dm.MetricGroups, "BATCH", 1 << 12)
    small, large = _peak(tmp_path, 20_000, 1), _peak(tmp_path, 200_000, 2)
    assert large - small < 2_000_000, (small, large)


@pytest.mark.parametrize("seed", range(6))
def test_magnitude_edges_equal_numpys_percentile_rule(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 3000))
    m = rng.normal(23, 1.5, n)
    if seed % 2:  # values piled on integers and slot edges, markers, NaN, a far sentinel
        pile = rng.random(n) < 0.3
        m[pile] = rng.integers(20, 26, int(pile.sum()))
        m[rng.integers(0, n, 40)] = rng.choice([99.0, np.nan, -99.0, 21.0, 25.0, np.inf], 40)
    m = m.astype(np.float32 if seed % 3 == 0 else np.float64)
    ok = np.asarray(m, dtype=np.float64)
    ok = ok[np.isfinite(ok) & (ok < 90)]
    want = np.arange(np.floor(np.percentile(ok, 1)), np.ceil(np.percentile(ok, 99)) + 0.5)
    np.testing.assert_array_equal(dm.default_mag_edges(m), want)
    sk = MagnitudeSketch()
    for part in np.array_split(m, 7):
        sk.add(part)
    np.testing.assert_array_equal(dm.default_mag_edges(sketch=sk), want)


def test_example_rows_are_within_one_bin_of_the_exact_ranks():
    rng = np.random.default_rng(4)
    z = np.concatenate([rng.uniform(0, 3, 5000), [np.nan, -1.0, 7.0]])
    rows = dt.example_rows(z, 0.0, 3.0, 6)
    inside = np.sort(z[np.isfinite(z) & (z >= 0) & (z <= 3)])
    exact = inside[np.linspace(0, inside.size - 1, 6).astype(int)]
    assert rows.size == 6
    assert np.all(np.abs(np.sort(z[rows]) - exact) <= 3.0 / dt.EXAMPLE_BINS)
