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


def _run_pipeline_in_process(pipe: dict, cfg: dict, out: Path) -> None:
    """Run a pipeline's stages in order in this process, as ceci would (files named by the aliases)."""
    import importlib

    for mod in pipe["modules"].split():
        importlib.import_module(mod)
    from rail.core.stage import RailStage

    overall = {k: str(v) for k, v in pipe.get("inputs", {}).items()}
    for st in pipe["stages"]:
        cls = RailStage.pipeline_stages[st["classname"]][0]
        aliases = st.get("aliases", {})
        paths = {}
        for tag, _ in cls.inputs + cls.outputs:
            alias = aliases.get(tag, tag)
            suffix = ".pkl" if tag == "model" else ".hdf5"
            paths[tag] = overall.get(alias, str(out / f"{alias}{suffix}"))
        opts = {k: v for k, v in cfg[st["name"]].items() if k != "name"}
        stage = cls.make_stage(name=_name(st["name"]), **opts, **paths)
        stage.run()
        stage.finalize()


def test_scene_pipeline_runs_on_tiny_scenes(tmp_path):
    """examples/scene_dc2.yml (simulate -> inform -> estimate -> evaluate), quick settings, stage by stage
    in-process in the pipeline's order; the same pipeline under ceci: test_ceci_runs_scene_pipeline (slow)."""
    pytest.importorskip("galsim", reason="the 'scenes' extra is not installed")
    import qp
    import tables_io

    mp = _make_pipelines()
    assert (REPO / "examples" / "scene_dc2.yml").is_file(), "run python examples/make_pipelines.py --keys scene"
    pipe_path = mp.write_scene_pipeline(tmp_path, quick=True, rel_to=tmp_path)
    pipe = yaml.safe_load(pipe_path.read_text())
    cfg = yaml.safe_load((tmp_path / "configs" / "scene_dc2_config.yml").read_text())
    assert [s["classname"] for s in pipe["stages"]] == [
        "DeepzExampleData", "DeepzSceneSimulator", "DeepzSceneSimulator", "DeepzSceneInformer",
        "DeepzSceneEstimator", "DeepzSceneEvaluator"]
    assert cfg["simulate_train_dc2"]["seed"] != cfg["simulate_test_dc2"]["seed"]
    cfg["data_dc2"].update(n_train=300, n_test=300)  # random rows; the simulator draws ~40 objects
    out = tmp_path / "out"
    out.mkdir()
    _run_pipeline_in_process(pipe, cfg, out)
    scenes = tables_io.read(str(out / "scenes_test_dc2.hdf5"))
    n_scenes = cfg["simulate_test_dc2"]["n_scenes"]
    assert scenes["images"].shape == (n_scenes, 6, 32, 32)
    ens = qp.read(str(out / "pz_scene.hdf5"))
    truth_n = len(tables_io.read(str(out / "truth_test_dc2.hdf5"))["x"])
    ti = ens.ancil["truth_index"]
    assert ens.npdf == len(ti) and np.all((ti >= -1) & (ti < truth_n))
    metrics = tables_io.read(str(out / "metrics_scene.hdf5"))
    rows = {(s.decode(), c.decode(), m.decode()): (v, n) for s, c, m, v, n in
            zip(metrics["section"], metrics["blend_class"], metrics["metric"], metrics["value"], metrics["n"])}
    purity, n_det = rows[("detection", "all", "purity")]
    assert n_det == ens.npdf and 0.0 <= purity <= 1.0
    assert ("detection", "blended", "completeness") in rows


@pytest.mark.slow
def test_ceci_runs_scene_pipeline(tmp_path):
    """The quick scene pipeline under ceci (one process per stage: about a minute of imports)."""
    import subprocess

    pytest.importorskip("galsim", reason="the 'scenes' extra is not installed")
    mp = _make_pipelines()
    pipe_path = mp.write_scene_pipeline(tmp_path, quick=True, rel_to=tmp_path)
    out = tmp_path / "out"
    ceci = Path(sys.executable).parent / "ceci"
    cmd = [str(ceci) if ceci.exists() else "ceci", str(pipe_path), f"output_dir={out}",
           f"log_dir={tmp_path / 'logs'}"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.out")) if (tmp_path / "logs").exists() else ""
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + logs[-3000:]
    assert (out / "metrics_scene.hdf5").is_file() and (out / "pz_scene.hdf5").is_file()


def test_scene_notebook_executes_quick(tmp_path, monkeypatch):
    """examples/scene_dc2.ipynb in its smoke mode (a few tiny scenes, one epoch)."""
    pytest.importorskip("galsim", reason="the 'scenes' extra is not installed")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    import os

    monkeypatch.setenv("DEEPZ_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("DEEPZ_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(REPO / "examples" / "scene_dc2.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "completeness" in text and "detections" in text
    assert (tmp_path / "scene_quick" / "metrics_scene.hdf5").is_file()
