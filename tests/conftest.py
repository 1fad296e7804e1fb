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
