"""benchmarks/stack.py --member-seed-offset (issue 18: does the DC2 result hold for other member
seeds?): the offset shifts the stage seed of the deep rows (80% and refit), enters their provenance
fingerprint and the results stem, and leaves the split and the baselines (FlexZBoost) alone.

The estimators are replaced by a recording stand-in (Gaussian PDFs around the truth), so the test
checks the harness, not any method, in seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest

N_TRAIN, N_TEST, K = 300, 200, 7
KEYS = ("nnc", "lstm", "flexzboost")


@pytest.fixture(scope="module")
def seed_runs(benchmark_module, stack_stand_in, tmp_path_factory):
    """Runs with offset 0 and K (separate folders), then offset K with --reuse in offset 0's folder."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _seed_runs(benchmark_module, stack_stand_in, monkeypatch, tmp_path_factory.mktemp("seeds"))


def _seed_runs(benchmark_module, stack_stand_in, monkeypatch, tmp_path):
    stack = benchmark_module("stack")
    calls = stack_stand_in(stack, monkeypatch, N_TRAIN, N_TEST,
                           lambda spec, ds: (0.01 * (KEYS.index(spec.key) + 1), 0.04))
    runs = {}
    for tag, offset, out in (("base", 0, "out0"), ("shifted", K, "outK"), ("reuse", K, "out0")):
        n = len(calls)
        argv = ["--data", "dc2", "--estimators", ",".join(KEYS), "--refit", "--variants", "none", "--stem", "t",
                "--out", str(tmp_path / out), "--results", str(tmp_path / "res"),
                *(["--member-seed-offset", str(offset)] if offset else []), *(["--reuse"] if tag == "reuse" else [])]
        assert stack.main(argv) == 0
        stem = "t" if not offset else f"t_seed{offset}"
        report = json.loads((tmp_path / "res" / f"{stem}.json").read_text())
        prov = {f"{k}{r}": json.loads((tmp_path / out / f"{k}{r}_provenance.json").read_text())["fingerprint"]
                for k in KEYS for r in ("", "_refit")}
        runs[tag] = {"calls": calls[n:], "report": report, "prov": prov}
    return runs


def _by_row(calls):
    """{row: call}: the first call of a key is its 80% row, the second its refit."""
    out = {}
    for c in calls:
        out[c["key"] + ("_refit" if c["key"] in out else "")] = c
    return out


def test_offset_reaches_the_deep_rows_stage_seed_only(seed_runs):
    base, shifted = _by_row(seed_runs["base"]["calls"]), _by_row(seed_runs["shifted"]["calls"])
    assert set(base) == set(shifted) == {f"{k}{r}" for k in KEYS for r in ("", "_refit")}
    for row in ("nnc", "lstm", "nnc_refit", "lstm_refit"):
        assert base[row]["seed"] is None  # the registry leaves the stage default (42)
        assert shifted[row]["seed"] == 42 + K
    for row in ("flexzboost", "flexzboost_refit"):  # the baseline is not touched
        assert base[row]["seed"] == shifted[row]["seed"]
    assert seed_runs["shifted"]["report"]["member_seed_offset"] == K
    assert seed_runs["base"]["report"]["member_seed_offset"] == 0


def test_offset_leaves_the_split_alone(seed_runs):
    base, shifted = _by_row(seed_runs["base"]["calls"]), _by_row(seed_runs["shifted"]["calls"])
    n_val = int(round(0.2 * N_TRAIN))
    for row in base:
        np.testing.assert_array_equal(base[row]["train_z"], shifted[row]["train_z"])
        np.testing.assert_array_equal(base[row]["test_z"], shifted[row]["test_z"])
    assert base["nnc"]["n_train"] == N_TRAIN - n_val and base["nnc_refit"]["n_train"] == N_TRAIN
    for tag in ("base", "shifted"):
        r = seed_runs[tag]["report"]
        assert (r["n_fit_estimators"], r["n_stack_validation"]) == (N_TRAIN - n_val, n_val)


def test_offset_is_in_the_deep_rows_fingerprint(seed_runs):
    base, shifted = seed_runs["base"]["prov"], seed_runs["shifted"]["prov"]
    for row in ("nnc", "lstm", "nnc_refit", "lstm_refit"):
        assert "member_seed_offset" not in base[row]  # offset 0: today's fingerprint, earlier records reusable
        assert shifted[row]["member_seed_offset"] == K
        assert shifted[row]["config_sha256"] != base[row]["config_sha256"]
        same = [k for k in base[row] if k != "config_sha256"]  # code, split, data: unchanged
        assert {k: shifted[row][k] for k in same} == {k: base[row][k] for k in same}
    for row in ("flexzboost", "flexzboost_refit"):
        assert shifted[row] == base[row]


def test_reuse_never_mixes_seed_sets(seed_runs):
    """Offset K with --reuse in offset 0's folder: the deep rows are retrained, FlexZBoost reused."""
    again = seed_runs["reuse"]
    assert sorted(_by_row(again["calls"])) == ["lstm", "lstm_refit", "nnc", "nnc_refit"]
    prov = again["report"]["provenance"]
    assert prov["flexzboost"]["reused"] and prov["flexzboost_refit"]["reused"]
    assert not any(prov[r]["reused"] for r in ("nnc", "lstm", "nnc_refit", "lstm_refit"))
    assert again["prov"]["nnc"]["member_seed_offset"] == K


def test_seed_sets_table_uses_the_validation_chosen_kind_and_flags_misses(benchmark_module, tmp_path):
    seed_sets = benchmark_module("seed_sets")
    label = "stack_logscore_magbin_refit"

    def reports(offset, sig_zmode, sig_chosen, pit):
        stack_r = {"git_commit": "x", "member_seed_offset": offset,
                   "metrics": {label: {"rail_sigma_iqr": sig_zmode, "rail_outlier_rate": 0.089, "pit_ks": pit,
                                       "cde_loss": -9.0}}}
        points = {"git_commit": "x",
                  "metrics": {label: {"mode_smooth_0.03": {"rail_sigma_iqr": sig_chosen, "rail_outlier_rate": 0.085},
                                      "median": {"rail_sigma_iqr": 0.0100, "rail_outlier_rate": 0.2}}},
                  "chosen_on_validation": {label: {"rail_sigma_iqr": {"kind": "mode_smooth_0.03",
                                                                      "validation": 0.0176, "test": sig_chosen}}}}
        sp, pp = tmp_path / f"s{offset}.json", tmp_path / f"p{offset}.json"
        sp.write_text(json.dumps(stack_r))
        pp.write_text(json.dumps(points))
        return f"{offset}={sp},{pp}"

    argv = ["--set", reports(0, 0.0178, 0.0174, 0.014), "--set", reports(5, 0.0179, 0.0177, 0.03),
            "--labels", label, "--stem", "s", "--results", str(tmp_path)]
    assert seed_sets.main(argv) == 0
    rep = json.loads((tmp_path / "s.json").read_text())
    rows = rep["rows"][label]
    # the kind chosen on validation, not the test-best (median here would look better on test)
    assert rows["0"]["chosen"]["rail_sigma_iqr"] == 0.0174 and rows["0"]["chosen_kind"] == "mode_smooth_0.03"
    assert all(rows["0"]["met_chosen"].values()) and not rows["0"]["met_zmode"]["rail_sigma_iqr"]
    assert not rows["5"]["met_chosen"]["rail_sigma_iqr"] and not rows["5"]["met_chosen"]["pit_ks"]
    s = rep["summary"][label]["chosen"]["rail_sigma_iqr"]
    assert s["n"] == 2 and s["min"] == 0.0174 and s["max"] == 0.0177 and abs(s["mean"] - 0.01755) < 1e-12
    with pytest.raises(SystemExit):  # a report made with another offset than the one claimed
        seed_sets.main(["--set", reports(5, 0.0179, 0.0177, 0.03).replace("5=", "6=", 1), "--labels", label,
                        "--stem", "s", "--results", str(tmp_path)])
