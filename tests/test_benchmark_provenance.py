"""The benchmark's reuse rules (benchmarks/stack.py --reuse, benchmarks/adopt_rows.py): a row's
qp files are reused only when its recorded provenance matches the current code, configuration
and split, and a model without a record is adopted only when its member 1 is the retrained single."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def bench(benchmark_module):
    return benchmark_module("stack"), benchmark_module("adopt_rows")


def _files(root: Path, files: dict) -> Path:
    for rel, text in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return root / "src"


def test_code_files_follow_imports_but_not_package_registration(bench, tmp_path):
    stack, _ = bench
    src = _files(tmp_path, {
        "src/rail/pkg/__init__.py": "import rail.pkg.other\n",  # registration only: not followed
        "src/rail/pkg/a.py": "from rail.pkg import b\ndef f():\n    from .c import g\n",
        "src/rail/pkg/b.py": "import numpy\n",
        "src/rail/pkg/c.py": "g = 1\n",
        "src/rail/pkg/other.py": "x = 1\n",
        "src/rail/evaluation/deepz_compare.py": "h = 1\n",
    })
    names = {str(p.relative_to(tmp_path)) for p in stack.code_files(["rail.pkg.a"], src=src)}
    assert names == {"src/rail/pkg/__init__.py", "src/rail/pkg/a.py", "src/rail/pkg/b.py", "src/rail/pkg/c.py",
                     "src/rail/evaluation/deepz_compare.py"}
    before = stack.code_hash(stack.code_files(["rail.pkg.a"], src=src), root=tmp_path)
    (src / "rail/pkg/other.py").write_text("x = 2\n")  # not imported by a: same hash
    assert stack.code_hash(stack.code_files(["rail.pkg.a"], src=src), root=tmp_path) == before
    (src / "rail/pkg/c.py").write_text("g = 2\n")  # imported inside a function: new hash
    assert stack.code_hash(stack.code_files(["rail.pkg.a"], src=src), root=tmp_path) != before


def test_reuse_needs_a_matching_record(bench, tmp_path):
    stack, _ = bench
    qp_files = (tmp_path / "k_val.hdf5", tmp_path / "k_test.hdf5")
    fp = {"key": "k", "code_sha256": "abc", "config_sha256": "def", "n_fit": 10}
    prov = tmp_path / "k_provenance.json"
    rec, why = stack.reusable(prov, qp_files, fp)
    assert rec is None and "missing" in why
    for f in qp_files:
        f.write_text("x")
    rec, why = stack.reusable(prov, qp_files, fp)
    assert rec is None and "k_provenance.json" in why  # qp files without a record are not reused
    prov.write_text(json.dumps({"fingerprint": fp, "git_commit": "c", "date": "d", "timings": {}}))
    rec, why = stack.reusable(prov, qp_files, fp)
    assert rec is not None and why == ""
    rec, why = stack.reusable(prov, qp_files, {**fp, "code_sha256": "new"})
    assert rec is None and "code_sha256" in why


def test_row_fingerprint_changes_with_the_configuration(bench):
    stack, _ = bench
    from rail.deepz import datasets
    from rail.evaluation import deepz_registry as reg

    try:
        ds = datasets.load_dc2(n_train=200, n_test=200)
    except FileNotFoundError as err:  # pragma: no cover
        pytest.skip(f"DC2 test files not available: {err}")
    split = {"data": "dc2", "n_fit": 200}
    a = stack.row_fingerprint(reg.get("nnc"), ds, False, split)
    b = stack.row_fingerprint(reg.get("nnc_x3"), ds, False, split)
    assert a == stack.row_fingerprint(reg.get("nnc"), ds, False, split)
    assert a["code_sha256"] == b["code_sha256"] and a["config_sha256"] != b["config_sha256"]


def test_adoption_refuses_a_member_that_is_not_the_retrained_single(bench):
    _, adopt = bench
    w = {"lin.weight": torch.ones(2, 2), "lin.bias": torch.zeros(2)}
    hist = [{"epoch": 0, "val_loss": -0.1}]
    single = {"state_dict": w, "arch": {"h": [4]}, "train": {"history": hist, "best_epoch": 0, "best_val_loss": -0.1},
              "temperature": 0.8}
    ens = {"member_state_dicts": [dict(w), {k: v + 1 for k, v in w.items()}], "n_members": 2, "format_version": 3,
           "arch": {"h": [4]}, "members_train": [{"history": hist, "best_epoch": 0, "best_val_loss": -0.1}],
           "temperature": 0.7}
    assert adopt.check_training(ens, single) == ("identical", [])
    # the weights differ but the first epochs' losses agree: the same computation rounded otherwise
    drift = dict(ens, member_state_dicts=[{**w, "lin.bias": torch.full((2,), 1e-3)}, w],
                 members_train=[{"history": [{"epoch": 0, "val_loss": -0.1 * (1 + 1e-9)}] * 3, "best_epoch": 2,
                                 "best_val_loss": -0.11}])
    single3 = dict(single, train=dict(single["train"], history=hist * 3))
    level, why = adopt.check_training(drift, single3)
    assert level.startswith("rounding:") and why == [] and float(level.split(":")[1]) < 1e-8
    level, why = adopt.check_training(dict(drift, arch={"h": [8]}), single3)
    assert level == "" and any("'arch'" in r for r in why)
    other = dict(drift, members_train=[{"history": [{"epoch": 0, "val_loss": -0.2}] * 3, "best_epoch": 0,
                                        "best_val_loss": -0.1}])
    level, why = adopt.check_training(other, single3)
    assert level == "" and any("differ beyond" in r for r in why)
    level, why = adopt.check_training(drift, dict(single, train=dict(single["train"], history=[])))
    assert level == "" and any("fewer than 1" in r for r in why)
