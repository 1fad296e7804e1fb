"""Parallel estimation with MPI through ceci: 2 ranks give the serial run's output.

RAIL's estimators split the input's chunks over the MPI ranks (rank r takes chunks r,
r + size, ...) and all ranks write their rows into ONE qp file with h5py's ``mpio``
driver. That needs ``mpiexec``, mpi4py and h5py built against a parallel HDF5 (see
benchmarks/README.md). Without them the tests skip, saying what is missing; with
``DEEPZ_REQUIRE_MPI=1`` (CI) they fail instead, so a broken MPI install cannot hide.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGE = "rail.estimation.algos.deepz_nnc.DeepzNNCEstimator"
N_ROWS, CHUNK = 3000, 400  # 8 chunks: 4 per rank


def _mpi_missing() -> str | None:
    """Why MPI estimation cannot run here (None when it can)."""
    if shutil.which("mpiexec") is None:
        return "no 'mpiexec' on PATH (install an MPI, e.g. apt-get install mpich libmpich-dev)"
    probe = (
        "import h5py\n"
        "from mpi4py import MPI\n"
        "assert h5py.get_config().mpi, 'h5py is not built with MPI'\n"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        return f"mpi4py / parallel h5py unusable: {last}"
    return None


@pytest.fixture(scope="module")
def mpi_setup(tmp_path_factory):
    why = _mpi_missing()
    if why:
        if os.environ.get("DEEPZ_REQUIRE_MPI") == "1":
            pytest.fail(f"DEEPZ_REQUIRE_MPI=1 but {why}")
        pytest.skip(why)
    import h5py

    from rail.deepz.datasets import load_dc2
    from rail.evaluation.deepz_registry import get

    tmp = tmp_path_factory.mktemp("mpi")
    ds = load_dc2(n_train=2000, n_test=N_ROWS, seed=11)
    spec = get("nnc")
    inf_cfg, est_cfg = spec.make_configs(ds, quick=True)
    inf_cfg.update(epochs=2, hidden_layers=[16], nbins=60, temperature_scaling=False)
    model = tmp / "model.pkl"
    inf = spec.informer_class.make_stage(name="mpi_test_inform", model=str(model), **inf_cfg)
    inf.inform(ds.train)
    assert model.exists()
    infile = tmp / "input.hdf5"
    with h5py.File(infile, "w") as f:
        g = f.create_group("photometry")
        for k, v in ds.test.items():
            g.create_dataset(k, data=np.asarray(v))
    est_cfg.update(hdf5_groupname="photometry", chunk_size=CHUNK, id_col="id", device="cpu")
    config = tmp / "config.yml"
    config.write_text(yaml.safe_dump({"DeepzNNCEstimator": est_cfg}))
    env = dict(os.environ, OMP_NUM_THREADS="1", DEEPZ_NUM_THREADS="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",  # Open MPI as root (CI)
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return dict(tmp=tmp, model=model, infile=infile, config=config, env=env, ids=np.asarray(ds.test["id"]))


def _run(cmd, env, cwd, timeout=300):
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    log = res.stdout + res.stderr
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{log[-4000:]}"
    return log


def _ceci_stage(s, output, mpi_ranks=0):
    cmd = [sys.executable, "-m", "ceci", STAGE, f"--input={s['infile']}", f"--model={s['model']}",
           f"--output={output}", f"--config={s['config']}"]
    if mpi_ranks:
        cmd = ["mpiexec", "-n", str(mpi_ranks), *cmd, "--mpi"]
    return _run(cmd, s["env"], s["tmp"])


def _ranks_used(log: str) -> dict:
    """{rank: [chunk starts]} from RAIL's 'Process r running estimator on chunk s - e' lines."""
    out: dict = {}
    for r, start in re.findall(r"Process (\d+) running estimator on chunk ([\d,]+) -", log):
        out.setdefault(int(r), []).append(int(start.replace(",", "")))
    return out


def _assert_same_ensemble(a_path, b_path):
    import qp

    a, b = qp.read(str(a_path)), qp.read(str(b_path))
    assert a.npdf == b.npdf == N_ROWS
    assert sorted(a.metadata) == sorted(b.metadata)
    for k in a.metadata:
        np.testing.assert_array_equal(np.asarray(a.metadata[k]), np.asarray(b.metadata[k]), err_msg=k)
    assert sorted(a.objdata) == sorted(b.objdata)
    for k in a.objdata:
        np.testing.assert_allclose(a.objdata[k], b.objdata[k], rtol=1e-6, atol=1e-9, err_msg=k)
    assert sorted(a.ancil) == sorted(b.ancil)
    for k in a.ancil:
        np.testing.assert_allclose(a.ancil[k], b.ancil[k], rtol=1e-6, atol=1e-9, err_msg=k)
    return a


@pytest.fixture(scope="module")
def serial_output(mpi_setup):
    out = mpi_setup["tmp"] / "serial.hdf5"
    log = _ceci_stage(mpi_setup, out)
    assert set(_ranks_used(log)) == {0}
    return out


def test_mpi_two_ranks_equal_serial(mpi_setup, serial_output):
    out = mpi_setup["tmp"] / "mpi2.hdf5"
    log = _ceci_stage(mpi_setup, out, mpi_ranks=2)
    ranks = _ranks_used(log)
    # both ranks processed chunks, interleaved: rank r takes chunks r, r+2, ...
    assert set(ranks) == {0, 1}, log[-3000:]
    assert sorted(ranks[0]) == list(range(0, N_ROWS, 2 * CHUNK))
    assert sorted(ranks[1]) == list(range(CHUNK, N_ROWS, 2 * CHUNK))
    ens = _assert_same_ensemble(serial_output, out)
    # one file holding every row once, in input order
    np.testing.assert_array_equal(ens.ancil["id"].ravel(), mpi_setup["ids"])


def test_mpi_pipeline_yaml(mpi_setup, serial_output):
    """examples/mpi_estimate.yml (ceci pipeline, nprocess 2, mpiexec) gives the serial output."""
    cfg = yaml.safe_load((REPO / "examples/configs/mpi_estimate_config.yml").read_text())
    cfg["estimate_nnc_mpi"]["chunk_size"] = CHUNK
    config = mpi_setup["tmp"] / "pipe_config.yml"
    config.write_text(yaml.safe_dump(cfg))
    outdir = mpi_setup["tmp"] / "pipe_out"
    cmd = [sys.executable, "-c", "import sys; from ceci.main import main; sys.exit(main())",
           str(REPO / "examples/mpi_estimate.yml"), f"config={config}",
           f"inputs.input={mpi_setup['infile']}", f"inputs.model={mpi_setup['model']}",
           f"output_dir={outdir}", f"log_dir={outdir / 'logs'}"]
    _run(cmd, mpi_setup["env"], mpi_setup["tmp"])
    log = (outdir / "logs" / "estimate_nnc_mpi.out").read_text()
    assert set(_ranks_used(log)) == {0, 1}, log[-3000:]
    _assert_same_ensemble(serial_output, outdir / "pz_nnc_mpi.hdf5")
