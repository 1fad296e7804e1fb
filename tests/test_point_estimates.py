"""benchmarks/point_estimates.py: the point estimate's kind is chosen on the validation rows only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def pe(benchmark_module):
    return benchmark_module("point_estimates")


def _m(s, e):
    return {"rail_sigma_iqr": s, "rail_outlier_rate": 0.1, "sigma_nmad": s, "eta": e, "n": 10}


def test_choice_follows_the_validation_rows_never_the_test_rows(pe):
    val = {"a": {"zmode_ancil": _m(0.02, 0.01), "median": _m(0.01, float("nan")), "mean": _m(0.03, 0.02)}}
    test = {"a": {"zmode_ancil": _m(0.001, 0.001), "median": _m(0.05, 0.05), "mean": _m(0.0001, 0.0001)},
            "only_test": {"zmode_ancil": _m(0.0, 0.0)}}
    got = pe.select_on_validation(val, test, ["rail_sigma_iqr", "eta"])
    assert set(got) == {"a"}  # no validation PDFs: nothing chosen
    assert got["a"]["rail_sigma_iqr"] == {"kind": "median", "validation": 0.01, "test": 0.05}
    assert got["a"]["eta"] == {"kind": "zmode_ancil", "validation": 0.01, "test": 0.001}  # NaN never chosen
    with pytest.raises(ValueError, match="a: no kind with a finite validation eta"):
        pe.select_on_validation({"a": {"median": _m(0.01, float("nan"))}}, {"a": {"median": _m(0.0, 0.0)}}, ["eta"])


def _write(path: Path, loc: np.ndarray, scale: float) -> None:
    import qp

    n = len(loc)
    ens = qp.Ensemble(qp.mixmod, data=dict(means=loc[:, None], stds=np.full((n, 1), scale),
                                           weights=np.ones((n, 1))))
    ens.write_to(str(path))


def _truth(path: Path, z: np.ndarray) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("redshift", data=z)


def test_main_reports_the_validation_choice_with_its_test_value(pe, tmp_path):
    rng = np.random.default_rng(0)
    zv, zt = rng.uniform(0.2, 0.8, 400), rng.uniform(0.2, 0.8, 300)
    # one estimator, PDFs centred near the truth: every kind is a sensible point estimate
    _write(tmp_path / "v.hdf5", zv + rng.normal(0, 0.01, zv.size), 0.02)
    _write(tmp_path / "t.hdf5", zt + rng.normal(0, 0.01, zt.size), 0.02)
    _truth(tmp_path / "vt.hdf5", zv)
    _truth(tmp_path / "tt.hdf5", zt)
    rc = pe.main(["--truth", str(tmp_path / "tt.hdf5"), "--estimate", f"x={tmp_path / 't.hdf5'}",
                  "--validation-truth", str(tmp_path / "vt.hdf5"), "--validation-estimate",
                  f"x={tmp_path / 'v.hdf5'}", "--zmax", "1.0", "--stem", "pe", "--results", str(tmp_path),
                  "--smooth", "0.01"])
    assert rc == 0
    rep = json.loads((tmp_path / "pe.json").read_text())
    assert rep["n_validation"] == 400 and rep["n_truth"] == 300
    for metric in ("rail_sigma_iqr", "eta"):
        c = rep["chosen_on_validation"]["x"][metric]
        val = rep["validation_metrics"]["x"]
        assert c["validation"] == min(v[metric] for v in val.values())  # the validation minimum
        assert c["test"] == rep["metrics"]["x"][c["kind"]][metric]  # reported at the test rows
    assert "Chosen on the 400 validation rows" in (tmp_path / "pe.md").read_text()


def test_validation_options_go_together(pe, tmp_path):
    with pytest.raises(SystemExit):
        pe.main(["--truth", "t.hdf5", "--estimate", "x=t.hdf5", "--validation-truth", "v.hdf5"])
    with pytest.raises(SystemExit):
        pe.main(["--truth", "t.hdf5", "--estimate", "x=t.hdf5", "--select-by", "crps"])


def test_stack_applied_to_its_own_validation_rows(tmp_path, benchmark_module):
    """benchmarks/stack_validation_pdfs.py: the fitted stack on the <key>_val.hdf5 files it was fitted on,
    the same PDFs as the stack of the ensembles in memory."""
    import h5py
    import torch
    from test_stack import make_inputs

    from rail.core.data import TableHandle
    from rail.estimation.algos import deepz_stack as ds

    torch.set_num_threads(1)
    z, ens = make_inputs(600, seed=3)
    paths = {}
    for k, e in ens.items():
        paths[k] = str(tmp_path / f"{k}_val.hdf5")
        e.write_to(paths[k])
    with h5py.File(tmp_path / "val_table.hdf5", "w") as f:
        f.create_dataset("redshift", data=z)
    inf = ds.DeepzStackInformer.make_stage(name="stack_inform_pe", model=str(tmp_path / "s.pkl"), inputs=paths,
                                           nzbins=150, hdf5_groupname="", holdout_fraction=0.0, max_iter=20)
    inf.inform(TableHandle("input", data={"redshift": z}))
    assert benchmark_module("stack_validation_pdfs").main(["--out", str(tmp_path), "--labels", "s"]) == 0
    import qp

    out = qp.read(str(tmp_path / "s_val.hdf5"))
    c, h, p, _ = ds.read_inputs(ens, ds.grid_edges(0, 3, 150), 0, z.size)
    direct = ds.stack_ensemble(inf.model, c, h, p)
    assert out.npdf == z.size
    assert np.allclose(out.objdata["pdfs"], direct.objdata["pdfs"], atol=1e-5)
