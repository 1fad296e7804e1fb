"""deepz-compare on a user's catalogue: files with foreign column names, z up to 4, a peer RAIL
estimator (kNN from pz-rail-sklearn), the one-line CLI errors, the registry as data and NNC's
bin width. Quick configurations on ~1,000 objects: the numbers are not judged, only that the
command produced them, on the grid the data needs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import qp

from rail.deepz import datasets
from rail.evaluation import deepz_cli
from rail.evaluation import deepz_registry as reg

BANDS = list("grizy")
COLS = dict(bands=",".join(f"mag_{b}_des" for b in BANDS), err_bands=",".join(f"magerr_{b}_des" for b in BANDS))


def _catalogue(n: int, seed: int) -> pd.DataFrame:
    """A smooth SED with a break moving with (1+z) through DES grizy; z uniform on (0.05, 3.97)."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.05, 3.97, n)
    mi = rng.uniform(19, 24, n)
    out = {}
    for b in BANDS:
        wl = datasets.FILTER_WAVELENGTHS["des"][b]
        m = mi + 2.5 * np.tanh((4000.0 * (1 + z) - wl) / 1500.0)
        err = 0.02 + 0.05 * np.exp(m - 24)
        out[f"mag_{b}_des"] = m + rng.normal(0, err)
        out[f"magerr_{b}_des"] = err
    out["z_spec"] = z
    out["objid"] = np.arange(n) + 100_000 * seed
    return pd.DataFrame(out)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("catalogue")
    train, test = d / "train.parquet", d / "test.csv"
    _catalogue(900, 1).to_parquet(train)
    _catalogue(300, 2).to_csv(test, index=False)
    return d, train, test


def _args(train, test, *more):
    return ["--train", str(train), "--test", str(test), "--bands", COLS["bands"], "--err-bands", COLS["err_bands"],
            "--redshift-col", "z_spec", "--id-col", "objid", *more]


@pytest.fixture(scope="module")
def run_out(files):
    d, train, test = files
    out = d / "out"
    rc = deepz_cli.main(_args(train, test, "--estimators", "nnc,knn", "--quick", "--out", str(out), "--quiet"))
    return rc, out


def test_command_on_a_foreign_catalogue_with_a_peer_estimator(run_out):
    rc, out = run_out
    assert rc == 0
    table = pd.read_csv(out / "metrics.csv")
    assert set(table.estimator) == {"nnc", "knn"}
    for est in ("nnc", "knn"):
        rows = table[(table.estimator == est) & (table.bin_type == "all")]
        assert {"sigma_nmad", "crps", "pit_ks", "inform_time_s"} <= set(rows.metric)
        assert qp.data_length(str(out / f"{est}.hdf5")) == 300
    # the grid comes from the training data (max 3.97 -> 4.0), not the former fixed [0, 3]
    zbins = table[table.bin_type == "redshift"]
    assert zbins.bin_hi.max() == pytest.approx(4.0)
    # magnitude bins default to the reference band (the i band, found by name)
    assert "magnitude" in set(table.bin_type)
    for name in ("pit_qq", "zphot_zspec", "metrics_vs_redshift", "metrics_vs_magnitude", "example_pdfs"):
        assert (out / f"{name}.png").stat().st_size > 1000, name
    # the estimators were told the grid: kNN's and NNC's PDFs live on [0, 4]
    assert qp.read_metadata(str(out / "nnc.hdf5"))["bins"].max() == pytest.approx(4.0)


def test_file_mode_scores_an_estimate_on_the_grid_it_was_made_on(run_out, tmp_path):
    """One grid rule: re-scoring the harness's own file gives the numbers of the run that made it."""
    rc, out = run_out
    first = pd.read_csv(out / "metrics.csv")
    rc = deepz_cli.main(["--truth", str(out / "truth_train.hdf5"), "--redshift-col", "z_spec",
                         "--estimate", f"nnc={out / 'nnc.hdf5'}", "--out", str(tmp_path), "--quiet", "--no-plots"])
    assert rc == 0
    again = pd.read_csv(tmp_path / "metrics.csv")
    a = first[(first.estimator == "nnc") & ~first.metric.str.endswith("time_s")].reset_index(drop=True)
    np.testing.assert_allclose(again.value.to_numpy(), a.value.to_numpy(), equal_nan=True)


def test_column_yaml_and_errors_are_one_line(files, tmp_path, capsys):
    d, train, test = files
    bad = tmp_path / "not_qp.hdf5"
    pd.DataFrame({"x": [1.0]}).to_csv(tmp_path / "x.csv")
    import h5py

    with h5py.File(bad, "w") as f:
        f["x"] = np.arange(3)
    cases = [
        (_args(train, test, "--chunk-size", "0"), 2, "--chunk-size"),
        (_args(train, test, "--zmin", "2", "--zmax", "1"), 2, "--zmax"),
        (["--data", "nope"], 2, "unknown data set 'nope'"),
        (["--train", str(train)], 2, "--bands"),
        (["--truth", str(test), "--redshift-col", "z_spec", "--estimate", f"x={bad}"], 1, str(bad)),
        (_args(train, test, "--estimators", "no_such"), 1, "no_such"),
        (["--train", str(train), "--bands", "mag_g_des", "--err-bands", "magerr_q_des"], 1, "magerr_q_des"),
    ]
    for argv, code, text in cases:
        assert deepz_cli.main([*argv, "--out", str(tmp_path / "o"), "--quiet"]) == code, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err and text in err[-1] and "Traceback" not in "\n".join(err), (argv, err)
    with pytest.raises(ValueError, match="chunk_size"):
        from rail.evaluation.deepz_compare import compare

        compare({"x": str(bad)}, str(test), chunk_size=0, outdir=tmp_path / "o")
    with pytest.raises(ValueError, match="not a qp"):
        deepz_cli.main(["--truth", str(test), "--redshift-col", "z_spec", "--estimate", f"x={bad}", "--debug",
                        "--out", str(tmp_path / "o")])
    # the column spec from YAML: the same Dataset as from the options
    yml = tmp_path / "cols.yml"
    yml.write_text("bands: [" + COLS["bands"] + "]\nerr_bands: [" + COLS["err_bands"] + "]\n"
                   "redshift_col: z_spec\nid_col: objid\nnondetect_val: [99, -99]\n")
    args = deepz_cli.build_parser().parse_args(["--train", str(train), "--test", str(test), "--columns", str(yml)])
    ds = deepz_cli._dataset(args)
    assert ds.bands == COLS["bands"].split(",") and ds.ref_band == "mag_i_des" and ds.zmax == pytest.approx(4.0)
    assert ds.extra["nondetect_val"] == [99, -99] and ds.extra["bpz_filters"][0] == "DECam_g"
    assert ds.wavelengths == [datasets.FILTER_WAVELENGTHS["des"][b] for b in BANDS]
    with pytest.raises(ValueError, match="unknown key"):
        datasets.ColumnSpec.from_dict({"bands": ["a"], "err_bands": ["b"], "redshift": "z"})


def test_registry_passes_shared_options_only_where_declared(files):
    d, train, test = files
    spec = datasets.ColumnSpec.from_dict(dict(bands=COLS["bands"], err_bands=COLS["err_bands"], redshift_col="z_spec",
                                              id_col="objid", nondetect_val=[99.0, -99.0]))
    ds = datasets.from_files(train, test, spec)
    inform, estimate = reg.get("knn").make_configs(ds)
    assert "err_bands" not in inform  # KNearNeighInformer has no err_bands option
    assert inform["nondetect_val"] == 99.0  # RAIL's shared option is one float
    assert estimate["zmax"] == pytest.approx(4.0) and estimate["nzbins"] == 401 and estimate["id_col"] == "objid"
    # BPZ gets the DECam filter curves from the band names
    _, est = reg.get("bpz").make_configs(ds)
    assert est["filter_list"] == [f"DECam_{b}" for b in BANDS]
    with pytest.raises(ValueError, match="not in RAIL's filter folder"):
        datasets.resolve_bpz_filters(ds.bands, ["SDSS_u"] * 5)
    # any RAIL estimator by import path: the estimator class by RAIL's naming convention
    s = reg.resolve("rail.estimation.algos.k_nearneigh:KNearNeighInformer")
    assert s.estimator.endswith(":KNearNeighEstimator") and s.key == "knearneigh"
    with pytest.raises(ImportError, match="no class"):
        reg.resolve("rail.estimation.algos.k_nearneigh:NopeInformer")
    # NNC's batch / lr and the embedding MDN's SOM side are stage defaults now, not registry settings
    assert not reg.get("nnc").rules
    nnc_inform = reg.get("nnc").make_configs(ds)[0]
    assert "batch_size" not in nnc_inform and "lr" not in nnc_inform
    assert "som_shape" not in reg.get("embed").make_configs(ds)[0]
    assert nnc_inform["nondetect_val"] == [99.0, -99.0]  # our stages take every marker
    assert "peers" in reg.GROUPS and set(reg.GROUPS["peers"]()) >= {"knn"}


def test_nnc_bins_from_a_bin_width():
    from rail.estimation.algos.deepz_nnc import DeepzNNCInformer, _n_bins

    def cfg(**kw):
        return DeepzNNCInformer.make_stage(name=f"nnc_bins_{len(kw)}_{sorted(kw.items())}", **kw).config

    assert _n_bins(cfg(zmax=3.0)) == 600  # the paper's dz = 0.005
    assert _n_bins(cfg(zmax=4.0)) == 800  # same resolution past z = 3
    assert _n_bins(cfg(zmax=4.0, nbins=150)) == 150
    assert _n_bins(cfg(zmax=4.0, dz=0.01)) == 400
    with pytest.raises(ValueError, match="both"):
        _n_bins(cfg(zmax=4.0, dz=0.01, nbins=150))


def test_band_names_give_wavelengths_or_keep_the_given_order():
    assert datasets.guess_wavelengths(["MAG_U", "MAG_G"]) == [3551.0, 4686.0]
    assert datasets.guess_wavelengths(["mag_i_lsst"]) == [7546.0]
    assert datasets.guess_wavelengths(["flux_a", "flux_b"]) is None
    assert datasets.default_zmax([0.2, 2.987]) == pytest.approx(3.0)
    assert datasets.default_zmax([3.026]) == pytest.approx(3.1)
    assert datasets.default_zmax([3.0]) == pytest.approx(3.1)
    # the DC2 preset gets its [0, 3] from the same rule (training maximum 2.987), for any subset
    assert datasets.load_dc2(n_train=50, n_test=50).zmax == pytest.approx(3.0)


def test_an_estimator_cannot_change_the_tables_the_next_one_reads(tmp_path, monkeypatch):
    """BPZ writes its zero-point offsets into its input columns: the harness hands each stage a copy."""
    from rail.evaluation import deepz_compare as dc

    ds = datasets.load_dc2(n_train=300, n_test=200, seed=3)
    before = {k: v.copy() for k, v in ds.test.items()}
    seen = {}

    class Writes:
        config_options = {}

        @classmethod
        def make_stage(cls, **kw):
            return cls()

        def inform(self, handle):
            handle.data["mag_i_lsst"] += 1.0

        def get_handle(self, tag):
            return None

        def estimate(self, handle):
            seen["mag"] = handle.data["mag_i_lsst"].copy()
            handle.data["mag_i_lsst"] -= 5.0
            raise RuntimeError("stop here")

    spec = reg.EstimatorSpec(key="writes", label="writes", informer="x:y", estimator="x:z", shared_inform=(),
                             shared_estimate=())
    monkeypatch.setattr(reg.EstimatorSpec, "informer_class", property(lambda self: Writes))
    monkeypatch.setattr(reg.EstimatorSpec, "estimator_class", property(lambda self: Writes))
    with pytest.raises(RuntimeError, match="stop here"):
        dc.run_estimator(spec, ds, tmp_path)
    np.testing.assert_array_equal(seen["mag"], before["mag_i_lsst"])
    for k in before:
        np.testing.assert_array_equal(ds.test[k], before[k])
