"""``import rail.deepz``, RAIL's stage discovery and the metric path of ``deepz-compare`` do not
import torch (issue 20: torch's import alone is ~3 s of every run, and every RAIL user pays
the discovery); the stages are registered all the same and import torch when they run."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import qp

CHILD = r"""
import importlib, inspect, json, pkgutil, sys
import rail.deepz
import rail.stages
from rail.core.stage import RailStage

rail.stages.import_and_attach_all(silent=True)
after_discovery = "torch" in sys.modules
expected, missing = [], []
import rail.estimation.algos, rail.evaluation
for pkg in (rail.estimation.algos, rail.evaluation):
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("deepz_"):
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ == mod.__name__ and issubclass(cls, RailStage) and not name.startswith("_"):
                expected.append(name)
                # estimators: found by the discovery (import rail.deepz) and attached to rail.stages;
                # evaluation stages: registered when their module is imported (as before)
                attached = pkg is rail.evaluation or getattr(rail.stages, name, None) is cls
                if not attached or RailStage.pipeline_stages.get(cls.name, (None,))[0] is not cls:
                    missing.append(name)
after_modules = "torch" in sys.modules

from rail.evaluation import deepz_cli
rc = deepz_cli.main(sys.argv[1:])
print("RESULT " + json.dumps(dict(after_discovery=after_discovery, after_modules=after_modules,
                                  after_metrics="torch" in sys.modules, rc=rc, expected=expected, missing=missing)))
"""


def _write_estimates(tmp_path, n=300, seed=3):
    """Small hist, interp and mixmod files (random PDFs) and their truth table."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.1, 2.5, n)
    edges = np.linspace(0.0, 3.0, 61)
    x = np.linspace(0.0, 3.0, 81)
    c = 0.5 * (edges[1:] + edges[:-1])
    mu = z + rng.normal(0, 0.1, n)
    ens = {
        "h": qp.Ensemble(qp.hist, data=dict(bins=edges, pdfs=np.exp(-0.5 * ((c - mu[:, None]) / 0.1) ** 2) + 1e-4)),
        "i": qp.Ensemble(qp.interp, data=dict(xvals=x, yvals=np.exp(-0.5 * ((x - mu[:, None]) / 0.1) ** 2) + 1e-4)),
        "m": qp.Ensemble(qp.mixmod, data=dict(weights=rng.dirichlet(np.ones(3), n),
                                              means=mu[:, None] + rng.normal(0, 0.2, (n, 3)),
                                              stds=rng.uniform(0.03, 0.3, (n, 3)))),
    }
    paths = {}
    for key, e in ens.items():
        paths[key] = tmp_path / f"{key}.hdf5"
        e.write_to(str(paths[key]))
    truth = tmp_path / "truth.hdf5"
    with h5py.File(truth, "w") as f:
        f["redshift"] = z
    return truth, paths


def test_discovery_and_metrics_do_not_import_torch(tmp_path):
    truth, paths = _write_estimates(tmp_path)
    argv = ["--truth", str(truth), *[a for k, p in paths.items() for a in ("--estimate", f"{k}={p}")],
            "--out", str(tmp_path / "out"), "--no-plots", "--quiet"]
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    r = json.loads(lines[0].split(" ", 1)[1])
    assert r["rc"] == 0
    assert not r["after_discovery"], "import rail.deepz / RAIL's stage discovery imported torch"
    assert not r["after_modules"], "importing a deepz stage module imported torch"
    assert not r["after_metrics"], "the metric pass of deepz-compare imported torch"
    # every deepz stage class is registered with RAIL and attached to rail.stages
    assert not r["missing"], r["missing"]
    for name in ("DeepzNNCInformer", "DeepzNNCEstimator", "DeepzEmbedEstimator", "DeepzLSTMEstimator",
                 "DeepzCNNEstimator", "DeepzSceneEstimator", "DeepzStackEstimator", "DeepzSOMFlagger"):
        assert name in r["expected"], name
    # and the metrics were computed for the three representations
    out = (tmp_path / "out" / "metrics.csv").read_text()
    for key in paths:
        assert key in out


def test_a_stage_imports_torch_when_it_runs():
    """The networks are imported by the stages when they train or estimate (not at import)."""
    code = ("import sys; from rail.estimation.algos.deepz_nnc import DeepzNNCInformer; "
            "assert 'torch' not in sys.modules; "
            "from rail.deepz.nets.nnc import NNCNetwork; import torch; "
            "print(isinstance(NNCNetwork(3, [4], 5, 0.0), torch.nn.Module))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "True"


BUILD_ALL = r"""
import inspect, importlib, json, pkgutil, sys
import rail.deepz, rail.estimation.algos
from rail.core.stage import RailStage
built, failed = [], []
for info in pkgutil.iter_modules(rail.estimation.algos.__path__):
    if not info.name.startswith("deepz_"):
        continue
    mod = importlib.import_module(f"rail.estimation.algos.{info.name}")
    for name, cls in inspect.getmembers(mod, inspect.isclass):
        if cls.__module__ == mod.__name__ and issubclass(cls, RailStage) and not name.startswith("_"):
            kw = {"model": "model.pkl"} if "model" in dict(cls.inputs) and "Informer" not in name else {}
            try:
                cls.make_stage(name=f"built_{name}", **kw)
                built.append(name)
            except Exception as err:  # reported, fails the test
                failed.append(f"{name}: {type(err).__name__}: {err}")
print("RESULT " + json.dumps(dict(built=built, failed=failed, torch="torch" in sys.modules)))
"""


def test_building_every_stage_does_not_import_torch():
    """Building a stage (``make_stage``: a notebook, a pipeline file) checks its options without
    torch (``rail.deepz.trainconfig``, ``rail.deepz.gmm``); torch comes when it trains or estimates."""
    proc = subprocess.run([sys.executable, "-c", BUILD_ALL], capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    r = json.loads(lines[0].split(" ", 1)[1])
    assert not r["failed"], r["failed"]
    for name in ("DeepzNNCInformer", "DeepzNNCEstimator", "DeepzLSTMInformer", "DeepzEmbedInformer",
                 "DeepzCNNInformer", "DeepzSceneInformer", "DeepzStackInformer", "DeepzSOMFlagger"):
        assert name in r["built"], name
    assert not r["torch"], "building a deepz stage imported torch"


def test_a_cuda_device_is_still_refused_when_the_stage_is_built():
    import torch

    from rail.deepz.trainconfig import TrainConfig

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        TrainConfig(device="cuda").validate()
    with pytest.raises(ValueError, match="'tpu'"):
        TrainConfig(device="tpu").validate()
    TrainConfig(device="auto").validate()
