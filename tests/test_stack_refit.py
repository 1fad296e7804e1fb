"""benchmarks/stack.py --refit (issue 18): the refitted members are trained on all training rows and
the stacks applied to them are the ones fitted on the 80% members' stack-validation PDFs.

The estimators are replaced by a recording stand-in (Gaussian PDFs around the truth, a per-key
offset and width), so the test checks the harness, not any method, in seconds."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

N_TRAIN, N_TEST = 300, 200


@pytest.fixture(scope="module")
def refit_run(benchmark_module, stack_stand_in, tmp_path_factory):
    """One --refit run (module-scoped; the stand-in stays patched for the --reuse rerun)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield from _refit_run(benchmark_module, stack_stand_in, monkeypatch, tmp_path_factory.mktemp("refit"))


def _refit_pdf(spec, ds):
    """(shift, width) per key; a refitted member differs from its 80% twin (more training rows)."""
    k = {"nnc": 0, "lstm": 1}[spec.key]
    return 0.01 * (k + 1) * (1.0 if len(ds.train[ds.redshift_col]) == N_TRAIN else -1.0), 0.03 + 0.02 * k


def _refit_run(benchmark_module, stack_stand_in, monkeypatch, tmp_path):
    stack = benchmark_module("stack")
    calls = stack_stand_in(stack, monkeypatch, N_TRAIN, N_TEST, _refit_pdf)
    out, res = tmp_path / "out", tmp_path / "res"
    argv = ["--data", "dc2", "--estimators", "nnc,lstm", "--refit", "--variants", "linear_pool,stack_logscore",
            "--stem", "t", "--out", str(out), "--results", str(res)]
    assert stack.main(argv) == 0
    report = json.loads((res / "t.json").read_text())
    yield stack, calls, out, res, report, argv


def test_refit_members_are_trained_on_all_training_rows(refit_run):
    stack, calls, out, _, report, _ = refit_run
    full = stack.load_dataset("dc2")
    all_z = np.sort(np.asarray(full.train[full.redshift_col], dtype=float))
    n_val = int(round(0.2 * N_TRAIN))
    assert [c["key"] for c in calls] == ["nnc", "lstm", "nnc", "lstm"]  # the 80% rows, then the refits
    for c in calls[:2]:  # 80%: a strict subset; estimate the stack-validation rows and the test file
        assert c["train_z"].size == N_TRAIN - n_val and c["n_test"] == n_val + N_TEST
    for c in calls[2:]:  # refit: every training row, the test file only
        assert np.array_equal(np.sort(c["train_z"]), all_z) and c["n_test"] == N_TEST
    assert report["refit"]["n_fit"] == N_TRAIN and report["refit"]["estimators"] == ["nnc", "lstm"]
    for key in ("nnc", "lstm"):
        rec = json.loads((out / f"{key}_refit_provenance.json").read_text())
        assert rec["fingerprint"]["n_fit"] == N_TRAIN and rec["fingerprint"]["refit"] is True
        assert not (out / f"{key}_refit_val.hdf5").exists()
    for row in ("nnc", "nnc_refit", "stack_logscore", "stack_logscore_refit", "linear_pool_refit",
                "equal_average_refit"):
        assert report["metrics"][row]["rail_sigma_iqr"] is not None


def test_refit_stack_is_the_one_fitted_on_the_80_percent_members(refit_run):
    import qp

    from rail.core.data import TableHandle
    from rail.deepz.modelfile import load_model
    from rail.estimation.algos import deepz_stack as dst

    _, _, out, _, report, _ = refit_run
    for label in ("linear_pool", "stack_logscore"):
        info = report["refit"]["stacks"][f"{label}_refit"]
        pkl = out / f"{label}.pkl"
        assert info["model_sha256"] == hashlib.sha256(pkl.read_bytes()).hexdigest()
        model = load_model(str(pkl))
        assert model["inputs"] == ["nnc", "lstm"]
        np.testing.assert_array_equal(model["weights"], np.asarray(report["models"][label]["weights"]))
        assert info["inputs"] == {k: str(out / f"{k}_refit_test.hdf5") for k in ("nnc", "lstm")}
        # the same fitted model on the refitted inputs reproduces the row; on the 80% inputs it does not
        again = {}
        for tag, suffix in (("refit", "_refit_test"), ("fit80", "_test")):
            est = dst.DeepzStackEstimator.make_stage(
                name=f"check_{label}_{tag}", model=model, hdf5_groupname="", output=str(out / f"chk_{label}_{tag}.hdf5"),
                inputs={k: str(out / f"{k}{suffix}.hdf5") for k in ("nnc", "lstm")})
            est.estimate(TableHandle("input", path=str(out / "test_table.hdf5")))
            again[tag] = qp.read(str(out / f"chk_{label}_{tag}.hdf5")).objdata["pdfs"]
        row = qp.read(str(out / f"{label}_refit.hdf5")).objdata["pdfs"]
        np.testing.assert_array_equal(row, again["refit"])
        assert not np.array_equal(row, again["fit80"])


def test_refit_rows_are_reused_when_their_record_matches(refit_run):
    stack, calls, _, res, report, argv = refit_run
    n = len(calls)
    assert stack.main([*argv, "--reuse"]) == 0
    assert len(calls) == n  # nothing retrained, refit rows included
    again = json.loads((res / "t.json").read_text())
    assert again["provenance"]["nnc_refit"]["reused"] and again["provenance"]["lstm_refit"]["reused"]
    assert again["metrics"]["stack_logscore_refit"] == report["metrics"]["stack_logscore_refit"]


def test_refit_needs_every_stacked_member(benchmark_module, tmp_path):
    stack = benchmark_module("stack")
    with pytest.raises(SystemExit):
        stack.main(["--estimators", "nnc,lstm", "--refit", "--refit-keys", "nnc",
                    "--variants", "linear_pool", "--out", str(tmp_path), "--results", str(tmp_path)])
    with pytest.raises(SystemExit):  # a stack needs its inputs' stack-validation PDFs
        stack.main(["--estimators", "none", "--stack-inputs", "nnc,lstm", "--refit",
                    "--variants", "linear_pool", "--out", str(tmp_path), "--results", str(tmp_path)])


def test_a_refit_only_process_trains_and_scores_the_refit_rows(refit_run, tmp_path):
    stack, calls, _, _, _, _ = refit_run  # (the stand-in patched in)
    n = len(calls)
    res = tmp_path / "res"
    assert stack.main(["--estimators", "none", "--stack-inputs", "nnc,lstm", "--refit", "--variants", "none",
                       "--stem", "r", "--out", str(tmp_path / "out"), "--results", str(res)]) == 0
    assert [c["key"] for c in calls[n:]] == ["nnc", "lstm"]
    assert set(json.loads((res / "r.json").read_text())["metrics"]) == {"nnc_refit", "lstm_refit"}
