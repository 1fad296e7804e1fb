"""Shared pytest setup."""

import os

import pytest


@pytest.fixture(autouse=True)
def _run_in_tmp_dir(tmp_path, monkeypatch):
    """Run each test in its own temporary folder.

    Stages made without an explicit output path write ``model_<stage name>.pkl`` (RAIL's
    default) into the working directory; this keeps them out of the checkout.
    """
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True, scope="module")
def _release_joblib_pool():
    """Shut down the joblib process pool FlexZBoost leaves behind at the end of each test
    module: next to it torch's CPU threads run 2-3x slower (rail.deepz.training)."""
    yield
    from rail.deepz.training import release_joblib_workers

    release_joblib_workers()


@pytest.fixture(autouse=True, scope="session")
def _fixed_torch_threads():
    """Stages choose torch's thread count from the machine's load (``num_threads=0``), and
    another count changes float rounding; tests that compare two runs bit for bit need one
    fixed count for the session: torch's own (``OMP_NUM_THREADS`` or the CPU count)."""
    import torch

    if not os.environ.get("DEEPZ_NUM_THREADS"):
        os.environ["DEEPZ_NUM_THREADS"] = str(torch.get_num_threads())
    yield


@pytest.fixture(scope="session")
def benchmark_module():
    """``load(name)``: import the script ``benchmarks/<name>.py`` (the scripts import each other as
    top-level modules, so their folder is on ``sys.path`` while one is imported)."""
    import importlib
    import sys
    from pathlib import Path

    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")

    def load(name: str):
        sys.path.insert(0, folder)
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(folder)

    return load


@pytest.fixture
def capture_validation(monkeypatch):
    """``capture_validation()`` replaces rail.deepz.training.train_model (which the informers
    import when they train) by a wrapper that records a copy of each call's validation inputs,
    then trains as usual; it returns the list the calls are appended to (one list per call)."""
    import numpy as np

    import rail.deepz.training as mod

    def install():
        real = getattr(mod.train_model, "real", mod.train_model)  # not an earlier spy
        calls = []

        def spy(net, loss, train_inputs, train_z, val_inputs, *args, **kw):
            calls.append([np.array(a, copy=True) for a in val_inputs])
            return real(net, loss, train_inputs, train_z, val_inputs, *args, **kw)

        spy.real = real
        monkeypatch.setattr(mod, "train_model", spy)
        return calls

    return install


@pytest.fixture(scope="session")
def stack_stand_in():
    """``install(stack, monkeypatch, n_train, n_test, pdf)`` for tests of ``benchmarks/stack.py``:
    DC2 cut to ``n_train`` / ``n_test`` rows (skips when the files are absent) and
    ``run_estimator`` replaced by a stand-in that writes Gaussian PDFs around the truth,
    ``pdf(spec, ds) -> (shift, width)``, with the inputs' ids; returns the list of calls it records
    (``key``, ``seed`` of the resolved inform configuration, ``train_z``, ``test_z``, ``n_train``,
    ``n_test``), in seconds instead of trainings."""
    import numpy as np

    def install(stack, monkeypatch, n_train, n_test, pdf):
        from rail.deepz import datasets
        from rail.evaluation import deepz_compare

        try:
            datasets.load_dc2(n_train=10, n_test=10)
        except FileNotFoundError as err:  # pragma: no cover
            pytest.skip(f"DC2 test files not available: {err}")
        monkeypatch.setattr(stack, "load_dataset",
                            lambda data, quick=False: datasets.load_dc2(n_train=n_train, n_test=n_test))
        calls = []

        def fake_run_estimator(spec, ds, outdir, *, quick=False, log=None, **kw):
            import qp

            inform, _ = spec.make_configs(ds, quick)  # what the real harness passes to the informer
            z = np.asarray(ds.test[ds.redshift_col], dtype=float)
            n_fit = len(ds.train[ds.redshift_col])
            calls.append({"key": spec.key, "seed": inform.get("seed"), "n_train": n_fit, "n_test": z.size,
                          "train_z": np.asarray(ds.train[ds.redshift_col], dtype=float), "test_z": z})
            shift, width = pdf(spec, ds)
            loc = np.clip(z + shift, 0.0, 3.0)[:, None]
            ens = qp.Ensemble(qp.mixmod, data={"means": loc, "stds": np.full_like(loc, width),
                                               "weights": np.ones_like(loc)})
            id_col = ds.extra.get("id_col") or "id"  # the estimates carry the input's ids, as the stages do
            ens.set_ancil({"zmode": loc[:, 0], id_col: np.asarray(ds.test[id_col]) if id_col in ds.test
                           else np.arange(z.size)})
            outdir.mkdir(parents=True, exist_ok=True)
            path = outdir / f"{spec.key}.hdf5"
            ens.write_to(str(path))
            return path, {"inform_time_s": 0.0, "estimate_time_s": 0.0, "n_train": n_fit, "n_test": int(z.size)}

        monkeypatch.setattr(deepz_compare, "run_estimator", fake_run_estimator)
        return calls

    return install
