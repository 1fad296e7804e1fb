"""Shared pytest setup."""

import pytest


@pytest.fixture(autouse=True)
def _run_in_tmp_dir(tmp_path, monkeypatch):
    """Run each test in its own temporary folder.

    Stages made without an explicit output path write ``model_<stage name>.pkl`` (RAIL's
    default) into the working directory; this keeps them out of the checkout.
    """
    monkeypatch.chdir(tmp_path)
