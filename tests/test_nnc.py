"""End-to-end tests of the binned CRPS classifier (NNC) as RAIL stages."""

import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import tables_io
from rail.core.data import TableHandle

from rail.deepz.datasets import load_dc2
from rail.deepz.photometry import BadPhotometryError
from rail.deepz.stages import FORMAT_VERSION, READABLE_FORMAT_VERSIONS, ModelFormatError
from rail.estimation.algos.deepz_nnc import DeepzNNCEstimator, DeepzNNCInformer

QUICK = dict(hidden_layers=[64, 32], nbins=150, epochs=40, batch_size=256, patience=8, progress=False,
             hdf5_groupname="", seed=3)
_counter = iter(range(10**6))


def _name(prefix):
    return f"{prefix}_{next(_counter)}"


@pytest.fixture(scope="module")
def dc2():
    return load_dc2(n_train=2500, n_test=3000, seed=11)


@pytest.fixture(scope="module")
def trained(dc2, tmp_path_factory):
    path = tmp_path_factory.mktemp("nnc") / "nnc_model.pkl"
    inf = DeepzNNCInformer.make_stage(name=_name("inf"), model=str(path), **QUICK)
    inf.inform(dc2.train)
    return inf, path


def _estimate(model, data, **kw):
    kw.setdefault("hdf5_groupname", "")
    kw.setdefault("output_mode", "return")
    est = DeepzNNCEstimator.make_stage(name=_name("est"), model=model, **kw)
    return est.estimate(data).data


def _nmad(zp, z):
    dz = (zp - z) / (1 + z)
    return 1.4826 * np.median(np.abs(dz - np.median(dz)))


def test_model_contents(trained, dc2):
    inf, path = trained
    m = inf.model
    assert m["method"] == "nnc" and m["format_version"] == FORMAT_VERSION
    assert m["bands"] == dc2.bands and len(m["edges"]) == 151
    assert 0.2 < m["temperature"] < 5.0
    assert len(m["train"]["history"]) >= 1 and m["train"]["best_epoch"] >= 0
    assert all(v.device.type == "cpu" for v in m["state_dict"].values())
    assert path.exists()


def test_learns_better_than_constant_and_pdfs_normalised(trained, dc2):
    inf, _ = trained
    ens = _estimate(inf.get_handle("model"), dc2.test)
    z = dc2.test["redshift"]
    assert ens.npdf == len(z)
    zmean = ens.ancil["zmean"]
    baseline = _nmad(np.full_like(z, np.median(dc2.train["redshift"])), z)
    assert _nmad(zmean, z) < 0.35 * baseline
    norms = np.ravel(ens.cdf(3.0) - ens.cdf(0.0))
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    for key in ("zmode", "zmedian", "zstd", "z_q2p5", "z_q97p5"):
        assert np.all(np.isfinite(ens.ancil[key]))
    assert np.all(ens.ancil["z_q2p5"] <= ens.ancil["zmedian"] + 1e-9)


def test_bf16_inference_on_cpu_stays_close_to_float32(trained, dc2):
    inf, _ = trained
    ref = _estimate(inf.get_handle("model"), dc2.test)
    bf = _estimate(inf.get_handle("model"), dc2.test, mixed_precision=True)
    z = dc2.test["redshift"]
    np.testing.assert_allclose(np.ravel(bf.cdf(3.0) - bf.cdf(0.0)), 1.0, atol=1e-5)
    diff = np.abs(bf.ancil["zmedian"] - ref.ancil["zmedian"])
    assert np.median(diff) < 2e-3 and np.percentile(diff, 95) < 2e-2
    assert _nmad(bf.ancil["zmedian"], z) == pytest.approx(_nmad(ref.ancil["zmedian"], z), rel=0.05)
    assert not np.array_equal(bf.ancil["zmean"], ref.ancil["zmean"])  # bf16 was really used


def test_chunked_file_output_aligned_with_ids(trained, dc2, tmp_path):
    inf, path = trained
    test = {k: v[:1000] for k, v in dc2.test.items()}
    infile = tmp_path / "test_in.hdf5"
    tables_io.write({"photometry": test}, str(infile))
    whole = _estimate(str(path), test, id_col="id")
    out = tmp_path / "nnc_out.hdf5"
    est = DeepzNNCEstimator.make_stage(name=_name("est"), model=str(path), chunk_size=333, id_col="id",
                                       hdf5_groupname="photometry", output=str(out))
    est.estimate(TableHandle("input", path=str(infile)))
    import qp

    chunked = qp.read(str(out))
    assert chunked.npdf == 1000
    np.testing.assert_array_equal(np.ravel(chunked.ancil["id"]), test["id"])
    np.testing.assert_allclose(np.ravel(chunked.ancil["zmean"]), whole.ancil["zmean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunked.objdata["pdfs"], whole.objdata["pdfs"], rtol=1e-5, atol=1e-5)


def test_model_loads_in_new_process(trained, dc2, tmp_path):
    _, path = trained
    test = {k: v[:200] for k, v in dc2.test.items()}
    infile = tmp_path / "in.hdf5"
    tables_io.write({"photometry": test}, str(infile))
    here = _estimate(str(path), test)
    script = textwrap.dedent(f"""
        import numpy as np
        from rail.core.data import TableHandle
        import rail.deepz  # plugin discovery path
        from rail.estimation.algos.deepz_nnc import DeepzNNCEstimator
        est = DeepzNNCEstimator.make_stage(name="fresh", model={str(path)!r}, output_mode="return",
                                           hdf5_groupname="photometry", device="cpu")
        ens = est.estimate(TableHandle("input", path={str(infile)!r})).data
        np.save({str(tmp_path / 'zmean.npy')!r}, np.ravel(ens.ancil["zmean"]))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "zmean.npy"), here.ancil["zmean"], rtol=1e-6)


def test_dataframe_input_and_bad_values(trained, dc2):
    inf, _ = trained
    test = {k: v[:300].copy() for k, v in dc2.test.items()}
    df = pd.DataFrame(test)
    ens_df = _estimate(inf.get_handle("model"), df)
    ens = _estimate(inf.get_handle("model"), test)
    np.testing.assert_allclose(ens_df.ancil["zmean"], ens.ancil["zmean"], rtol=1e-6)
    test["mag_u_lsst"][:50] = 99.0
    test["mag_g_lsst"][50:100] = np.nan
    test["mag_r_lsst"][100:150] = np.inf
    ens_bad = _estimate(inf.get_handle("model"), test)
    pdfs = ens_bad.objdata["pdfs"]
    assert np.all(np.isfinite(pdfs)) and np.all(pdfs >= 0)
    np.testing.assert_allclose(pdfs.sum(1) * np.diff(inf.model["edges"])[0], 1.0, rtol=1e-4)


def test_missing_band_column_is_refused_with_its_name(trained, dc2):
    inf, _ = trained
    test = {k: v[:100] for k, v in dc2.test.items() if k != "mag_y_lsst"}
    with pytest.raises(BadPhotometryError, match="mag_y_lsst"):
        _estimate(inf.get_handle("model"), test)


def test_model_trained_on_other_bands_is_refused(trained, dc2):
    inf, _ = trained
    with pytest.raises(BadPhotometryError, match="trained on bands"):
        _estimate(inf.get_handle("model"), dc2.test, bands=dc2.bands[1:], err_bands=dc2.err_bands[1:])


def test_model_version_and_method_checks(trained, dc2):
    inf, _ = trained
    old = dict(inf.model, format_version=max(READABLE_FORMAT_VERSIONS) + 1)
    with pytest.raises(ModelFormatError, match="format version"):
        _estimate(old, dc2.test)
    other = dict(inf.model, method="lstm")
    with pytest.raises(ModelFormatError, match="'lstm' model"):
        _estimate(other, dc2.test)
    with pytest.raises(ModelFormatError, match="not a rail.deepz model"):
        _estimate({"weights": 1}, dc2.test)


def test_unknown_config_key_is_refused():
    with pytest.raises(ValueError, match=r"'nbin'.*did you mean 'nbins'"):
        DeepzNNCInformer.make_stage(name=_name("inf"), nbin=100)
    with pytest.raises(ValueError, match="bogus_option"):
        DeepzNNCEstimator.make_stage(name=_name("est"), bogus_option=1)


def test_option_values_are_checked():
    with pytest.raises(ValueError, match="device"):
        DeepzNNCEstimator.make_stage(name=_name("est"), device="gpu")
    with pytest.raises(ValueError, match="zmax"):
        DeepzNNCInformer.make_stage(name=_name("inf"), zmin=2.0, zmax=1.0)
    with pytest.raises(ValueError, match="optimizer"):
        DeepzNNCInformer.make_stage(name=_name("inf"), optimizer="sgd")
    with pytest.raises(ValueError, match="inference_batch_size"):
        DeepzNNCEstimator.make_stage(name=_name("est"), inference_batch_size=-1)


def test_inference_batch_size_does_not_change_the_pdfs(trained, dc2):
    """0 (automatic: 4096 on CPU) and explicit sizes give the same PDFs; the stage reports its choice."""
    sub = {k: v[:5000] for k, v in dc2.test.items()}
    est = DeepzNNCEstimator.make_stage(name=_name("est"), model=str(trained[1]), device="cpu", hdf5_groupname="")
    est.open_model(**est.config)
    assert est.inference_batch_size == 4096
    ref = _estimate(str(trained[1]), sub, device="cpu")
    for bs in (1000, 65536):
        ens = _estimate(str(trained[1]), sub, device="cpu", inference_batch_size=bs)
        np.testing.assert_allclose(ens.objdata["pdfs"], ref.objdata["pdfs"], rtol=1e-5, atol=1e-6)
        # float rounding of another GEMM blocking may flip a near-tie between two bins
        assert np.mean(ens.ancil["zmode"] == ref.ancil["zmode"]) > 0.999


def test_loss_and_mode_options_are_checked(trained, dc2):
    with pytest.raises(ValueError, match="nll_weight"):  # refused when the stage is made, before any data
        DeepzNNCInformer.make_stage(name=_name("inf"), model="unused.pkl", nll_weight=-1.0, **QUICK)
    with pytest.raises(ValueError, match="mode_window"):
        _estimate(str(trained[1]), dc2.test, mode_window=-0.1)


def test_redshift_checks(dc2):
    small = {k: v[:300].copy() for k, v in dc2.train.items()}
    small["redshift"][0] = 3.5
    cfg = dict(QUICK, epochs=1)
    with pytest.raises(ValueError, match="z_out_of_range"):
        DeepzNNCInformer.make_stage(name=_name("inf"), **cfg).inform(small)
    inf = DeepzNNCInformer.make_stage(name=_name("inf"), z_out_of_range="drop", **cfg)
    inf.inform(small)
    small["redshift"][1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        DeepzNNCInformer.make_stage(name=_name("inf"), z_out_of_range="clip", **cfg).inform(small)
    with pytest.raises(KeyError, match="redshift_col"):
        DeepzNNCInformer.make_stage(name=_name("inf"), redshift_col="zspec", **cfg).inform(small)


def test_seed_makes_training_deterministic(dc2):
    small = {k: v[:600] for k, v in dc2.train.items()}
    cfg = dict(QUICK, epochs=3, temperature_scaling=False)
    models = []
    for seed in (5, 5, 6):
        inf = DeepzNNCInformer.make_stage(name=_name("inf"), **dict(cfg, seed=seed))
        inf.inform(small)
        models.append(inf.model["state_dict"])
    same = all(np.array_equal(models[0][k].numpy(), models[1][k].numpy()) for k in models[0])
    differ = any(not np.array_equal(models[0][k].numpy(), models[2][k].numpy()) for k in models[0])
    assert same and differ


def test_mask_policy_adds_indicators_and_runs(dc2):
    small = {k: v[:800] for k, v in dc2.train.items()}
    inf = DeepzNNCInformer.make_stage(name=_name("inf"), missing_policy="mask", **dict(QUICK, epochs=2))
    inf.inform(small)
    assert "valid" in inf.model["arch"]["features"]
    assert inf.model["photometry"]["missing_policy"] == "mask"
    ens = _estimate(inf.get_handle("model"), {k: v[:100] for k, v in dc2.test.items()})
    assert ens.npdf == 100


def test_val_column_split(dc2):
    small = {k: v[:600] for k, v in dc2.train.items()}
    small["is_val"] = np.arange(600) % 5 == 0
    inf = DeepzNNCInformer.make_stage(name=_name("inf"), val_column="is_val", **dict(QUICK, epochs=2))
    inf.inform(small)
    with pytest.raises(KeyError, match="val_column"):
        DeepzNNCInformer.make_stage(name=_name("inf"), val_column="nope", **dict(QUICK, epochs=2)).inform(small)


def test_rail_interactive_discovers_and_runs_nnc(tmp_path):
    """`import rail.interactive` finds the plugin on its own (fresh process) and its functions run."""
    script = textwrap.dedent("""
        import numpy as np
        import rail.interactive
        from rail.interactive.estimation.algos import deepz_nnc
        from rail.deepz.datasets import load_dc2
        ds = load_dc2(n_train=500, n_test=200, seed=1)
        model = deepz_nnc.deepz_nnc_informer(training_data=ds.train, hdf5_groupname="", epochs=2,
                                             hidden_layers=[16], nbins=60, progress=False)
        out = deepz_nnc.deepz_nnc_estimator(input_data=ds.test, model=model["model"], hdf5_groupname="")
        ens = out["output"]
        assert ens.npdf == 200, ens.npdf
        print("OK", float(np.mean(ens.ancil["zmean"])))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK" in res.stdout


def test_automatic_batch_and_lr(dc2, monkeypatch):
    """batch_size / lr left at 0: 1024 / 1e-3 below 100,000 training objects, the paper's 4096 / 5e-4 from
    there; resolved from the table in _fit, recorded in the model; explicit values are kept."""
    from rail.estimation.algos import deepz_nnc

    small = {k: np.asarray(v)[:600] for k, v in dc2.train.items()}
    fast = dict(hidden_layers=[16], nbins=60, epochs=2, patience=2, progress=False, hdf5_groupname="", seed=3,
                temperature_scaling=False)
    inf = DeepzNNCInformer.make_stage(name=_name("auto"), **fast)
    assert (inf.config.batch_size, inf.config.lr) == (0, 0.0)
    inf.inform(small)
    rec = inf.model["train"]
    assert (rec["batch_size"], rec["lr"], rec["automatic"]) == (1024, 1e-3, ["batch_size", "lr"])
    # explicit values are kept (only the one left at 0 is automatic)
    inf = DeepzNNCInformer.make_stage(name=_name("explicit"), batch_size=128, **fast)
    inf.inform(small)
    rec = inf.model["train"]
    assert (rec["batch_size"], rec["lr"], rec["automatic"]) == (128, 1e-3, ["lr"])
    # a large table (the count, not 100k rows): the threshold is read when _fit resolves
    assert deepz_nnc.automatic_batch_lr(99_999) == (1024, 1e-3)
    assert deepz_nnc.automatic_batch_lr(100_000) == (4096, 5e-4)
    tc = inf.automatic_training(inf.train_config, 2_000_000)
    assert (tc.batch_size, tc.lr) == (128, 5e-4)
    monkeypatch.setattr(deepz_nnc, "AUTO_N_TRAIN", 500)  # 600 rows now count as a large table
    inf = DeepzNNCInformer.make_stage(name=_name("large"), **fast)
    inf.inform(small)
    assert (inf.model["train"]["batch_size"], inf.model["train"]["lr"]) == (4096, 5e-4)
    # 0 = automatic; other values out of range are refused naming the option
    for bad in (dict(batch_size=1), dict(lr=-1e-3)):
        with pytest.raises(ValueError, match=f"'{next(iter(bad))}'.*0 = automatic"):
            DeepzNNCInformer.make_stage(name=_name("bad"), **bad)


def test_automatic_settings_match_the_dc2_harness():
    """For DC2's 10,225 training rows the stage resolves what the registry set before these became stage
    defaults: batch 1024, lr 1e-3, a 7x7 SOM (formula then: int(sqrt(0.1 * n_train / 20)) in 4..20)."""
    from rail.deepz.som_options import auto_som_side
    from rail.deepz.training import split_indices
    from rail.estimation.algos.deepz_nnc import automatic_batch_lr

    n_train = 10_225
    assert automatic_batch_lr(n_train) == (1024, 1e-3)
    _, va = split_indices(n_train, 0.1, 42)
    assert auto_som_side(len(va)) == int(min(20, max(4, (0.1 * n_train / 20.0) ** 0.5))) == 7
