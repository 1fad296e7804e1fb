"""The example ceci pipelines cover every method; the synthetic-stamps stage feeds the CNN.

Running a pipeline under ``ceci`` is tested once, for NNC (tests/test_evaluation.py); here the
CNN pipeline's extra stages run in-process with the settings the generator writes.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from rail.deepz.datasets import load_dc2

REPO = Path(__file__).resolve().parents[1]
_counter = iter(range(10**6))


def _make_pipelines():
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import make_pipelines
    finally:
        sys.path.pop(0)
    return make_pipelines


def _name(prefix):
    return f"{prefix}_{next(_counter)}"


def test_every_method_has_a_checked_in_pipeline(tmp_path):
    written = _make_pipelines().write_pipelines(tmp_path, datasets=("dc2",), rel_to=tmp_path)
    keys = {p.stem.rsplit("_", 1)[0] for p in written}
    assert {"nnc", "embed", "lstm", "cnn", "flexzboost", "bpz"} <= keys
    for key in ("nnc", "embed", "lstm", "cnn"):
        assert (REPO / "examples" / f"{key}_dc2.yml").is_file(), f"run python examples/make_pipelines.py ({key})"


def test_cnn_pipeline_reads_stamped_tables(tmp_path):
    mp = _make_pipelines()
    mp.write_pipelines(tmp_path, keys=["cnn"], datasets=("dc2",), rel_to=tmp_path)
    pipe = yaml.safe_load((tmp_path / "cnn_dc2.yml").read_text())
    assert "rail.evaluation.deepz_stamps" in pipe["modules"].split()
    stages = {s["name"]: s for s in pipe["stages"]}
    assert stages["stamps_train_dc2"]["aliases"] == {"input": "train_dc2", "output": "train_dc2_stamps"}
    assert stages["stamps_test_dc2"]["aliases"] == {"input": "test_dc2", "output": "test_dc2_stamps"}
    assert stages["inform_cnn"]["aliases"]["input"] == "train_dc2_stamps"
    assert stages["estimate_cnn"]["aliases"]["input"] == "test_dc2_stamps"
    cfg = yaml.safe_load((tmp_path / "configs" / "cnn_dc2_config.yml").read_text())
    # train and test stamps get independent noise
    assert cfg["stamps_train_dc2"]["seed"] != cfg["stamps_test_dc2"]["seed"]
    assert cfg["inform_cnn"]["image_col"] == cfg["stamps_train_dc2"]["column"] == "images"
    assert cfg["inform_cnn"]["image_bands"] == cfg["stamps_train_dc2"]["bands"]


def test_synthetic_stamps_stage_feeds_the_cnn(tmp_path):
    """The generated (quick) stage configs, run in-process in the pipeline's order."""
    from rail.estimation.algos.deepz_cnn import DeepzCNNEstimator, DeepzCNNInformer
    from rail.evaluation.deepz_stamps import DeepzSyntheticStamps

    mp = _make_pipelines()
    mp.write_pipelines(tmp_path, keys=["cnn"], datasets=("dc2",), quick=True, rel_to=tmp_path)
    cfg = yaml.safe_load((tmp_path / "configs" / "cnn_dc2_config.yml").read_text())
    ds = load_dc2(n_train=300, n_test=120, seed=0)  # random rows: the files are sorted by redshift
    train, test = ds.train, ds.test

    def stamps(section, table):
        opts = {k: v for k, v in cfg[section].items() if k != "name"}
        stage = DeepzSyntheticStamps.make_stage(name=_name(section), output=str(tmp_path / f"{section}.hdf5"), **opts)
        return stage.add_stamps(table).data

    st_train, st_test = stamps("stamps_train_dc2", train), stamps("stamps_test_dc2", test)
    bands = cfg["stamps_train_dc2"]["bands"]
    assert st_train["images"].shape == (300, len(bands), mp.STAMP_SIZE, mp.STAMP_SIZE)
    assert st_train["images"].dtype == np.float32 and np.all(np.isfinite(st_train["images"]))
    for col in train:  # the catalog columns are passed through unchanged, the input is not modified
        np.testing.assert_array_equal(st_train[col], train[col])
    assert "images" not in train
    inf_opts = {k: v for k, v in cfg["inform_cnn"].items() if k != "name"}
    inf = DeepzCNNInformer.make_stage(name=_name("inform_cnn"), model=str(tmp_path / "cnn.pkl"), **inf_opts)
    inf.inform(st_train)
    est_opts = {k: v for k, v in cfg["estimate_cnn"].items() if k != "name"}
    est = DeepzCNNEstimator.make_stage(name=_name("estimate_cnn"), model=inf.get_handle("model"),
                                       output=str(tmp_path / "pz_cnn.hdf5"), **est_opts)
    ens = est.estimate(st_test).data
    assert ens.npdf == 120
    assert np.all(np.isfinite(ens.ancil["zmode"]))


def test_synthetic_stamps_stage_checks_its_input(tmp_path):
    from rail.evaluation.deepz_stamps import DeepzSyntheticStamps

    ds = load_dc2(n_train=10, n_test=20, seed=0)
    table = ds.test
    opts = dict(bands=list(ds.bands), mag_limits=dict(ds.mag_limits), redshift_col=ds.redshift_col)
    with pytest.raises(ValueError, match="bogus"):
        DeepzSyntheticStamps.make_stage(name=_name("st"), bogus=1, **opts)
    stage = DeepzSyntheticStamps.make_stage(name=_name("st"), column="mag_i_lsst",
                                            output=str(tmp_path / "a.hdf5"), **opts)
    with pytest.raises(ValueError, match="already has a column 'mag_i_lsst'"):
        stage.add_stamps(table)
    stage = DeepzSyntheticStamps.make_stage(name=_name("st"), output=str(tmp_path / "b.hdf5"),
                                            **dict(opts, mag_limits={}))
    with pytest.raises(KeyError, match="mag_limits"):
        stage.add_stamps(table)
