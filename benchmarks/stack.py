"""Stacking benchmark (issue 18): the stack beside each single estimator on DC2.

DC2 (pz-rail-base files): the 10,225-row training file is split at random (seed 0) into
80% on which NNC, LSTM, embedding MDN and FlexZBoost are trained through the registry
(:func:`rail.evaluation.deepz_compare.run_estimator`, registry default settings), and a 20%
*stack validation* split. Each estimator estimates the stack-validation rows and the
20,449-row test file in one call (the two tables concatenated); the qp files are then cut
into the two row ranges. On the stack-validation split the stack is informed
(:class:`~rail.estimation.algos.deepz_stack.DeepzStackInformer`), then applied to the test
files. Rows of the report, all scored on the test file by
:func:`rail.evaluation.deepz_compare.compare` (point estimate zmode):

* each single estimator;
* ``equal_average``: the equal-weight linear pool on the stack's grid (no fit);
* ``linear_pool``: fitted weights, no recalibration (``recalibrate=False``);
* ``stack_crps``: weights + beta transform, CRPS, global;
* ``stack_crps_magbin``: the same per quartile of mag_i_lsst;
* ``stack_logscore``: weights + beta transform, log score, global;
* ``stack_logscore_magbin``: the same per quartile of mag_i_lsst.

The single estimators are trained on 80% of the training file, so they are slightly
worse than in ``accuracy_dc2``; every row here sees the same training data.

``--refit`` adds the refit step of stacking: each stacked estimator (or those of
``--refit-keys``) is trained again, with the same registry configuration and seeds, on *all*
rows of the training file and estimates the test file (rows ``<key>_refit``); every stack
fitted above, on the 80% members' PDFs of the stack-validation rows, is then applied
unchanged (its ``<label>.pkl``) to the refitted members' test PDFs (rows ``<label>_refit``).
Nothing is fitted or chosen on the refitted members' PDFs: the stack-validation rows are in
their training set, so their PDFs there are in-sample. The 80% rows and stacks stay in the
table for comparison.

    python benchmarks/stack.py            # writes benchmarks/results/stack_dc2.{json,md}
    python benchmarks/stack.py --quick    # smoke run (quick configs, small subsets)
    python benchmarks/stack.py --reuse    # retrain only rows whose recorded provenance no longer matches
    python benchmarks/stack.py --refit    # also members refitted on all training rows under the same stacks
    python benchmarks/stack.py --refit --member-seed-offset 1000   # the same with other member seeds

``--member-seed-offset K`` (default 0: the registry's seeds) adds K to the stage ``seed`` of
every trained deep row (registry entries that are not baselines and whose informer declares
``seed``: the singles, the ensembles and their refits); an ensemble's member m is trained with
``seed + m`` as always (:func:`rail.deepz.ensemble.member_seed`), and the informer's own
early-stopping split, drawn from ``seed``, follows. The stack split (seed 0), FlexZBoost, BPZ
and the stacks' own ``seed`` are unchanged, so the baselines' rows can be reused across seed
sets. K enters each deep row's fingerprint (``member_seed_offset`` and the configuration hash),
so ``--reuse`` never takes a row of another seed set; the results stem gets ``_seed<K>``.

Provenance: every trained row leaves ``<out>/<key>_provenance.json`` beside its qp files: the
git commit, a SHA-256 of the code that trains and estimates it (the repository modules its
stages import, transitively, and the harness's ``deepz_compare.py``; the package version
for FlexZBoost and BPZ), the stage classes and the row's resolved inform/estimate
configuration (what the registry entry amounts to), the data set, split and seed, and its times. ``--reuse`` reuses a row's qp files only when that record matches the current
code, configuration and split exactly; any other row is retrained (the reason is printed
and recorded in the report's ``provenance``), never a silent mix. Scoring and the stacks are
always recomputed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from accuracy import git_commit, machine_info  # noqa: E402

ESTIMATORS = ("nnc", "lstm", "embed", "flexzboost")
REPORT = ["rail_sigma_iqr", "rail_outlier_rate", "sigma_nmad", "eta", "crps", "pit_ks", "cde_loss", "pco"]


# harness code every row goes through (scoring is recomputed on every run, so not included; the
# registry enters through the resolved configuration and the stage classes it names)
HARNESS = ("src/rail/evaluation/deepz_compare.py",)


def _module_file(name: str, src: Path) -> Path | None:
    base = src.joinpath(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def code_files(modules, src: Path = HERE.parent / "src") -> list[Path]:
    """This repository's source files that ``modules`` import, transitively (every import
    statement, including those inside functions), plus :data:`HARNESS`. Packages' ``__init__``
    files are hashed but their imports not followed (``rail.deepz`` imports every stage module
    only to register it with RAIL)."""
    import ast

    todo = [m for m in modules]
    seen: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        f = _module_file(name, src)
        if f is None or name in seen:
            continue
        seen[name] = f
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages
        if f.name == "__init__.py":  # hashed, not followed: rail.deepz's imports every stage to register it
            continue
        pkg = parts[:-1]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                todo += [al.name for al in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = pkg[:len(pkg) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                todo += [mod] + [f"{mod}.{al.name}" for al in node.names]
    root = src.parent
    return sorted(set(seen.values()) | {root / h for h in HARNESS})


def code_hash(files, root: Path = HERE.parent) -> str:
    """SHA-256 over the repository paths and contents of ``files``."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(str(Path(f).relative_to(root)).encode() + b"\0" + Path(f).read_bytes() + b"\0")
    return h.hexdigest()


def seed_shifted(spec, offset: int):
    """``spec`` with its informer's ``seed`` shifted by ``offset`` when it is a deep row (not a
    baseline, informer declaring ``seed``); ``spec`` itself when ``offset`` is 0 or for
    FlexZBoost, BPZ and other baselines. The shifted seed is the resolved one (the stage default
    unless the registry sets it) plus ``offset``."""
    from dataclasses import dataclass, fields

    from rail.evaluation.deepz_registry import EstimatorSpec, _declared

    if not offset or spec.baseline or not _declared(spec.informer_class, "seed"):
        return spec

    @dataclass
    class SeedShiftedSpec(EstimatorSpec):
        member_seed_offset: int = 0

        def make_configs(self, ds, quick: bool = False) -> tuple[dict, dict]:
            inform, estimate = super().make_configs(ds, quick)
            base = inform.get("seed", self.informer_class.config_options["seed"].default)
            inform["seed"] = int(base) + self.member_seed_offset
            return inform, estimate

    return SeedShiftedSpec(**{f.name: getattr(spec, f.name) for f in fields(spec)},
                           member_seed_offset=int(offset))


def row_fingerprint(spec, ds, quick: bool, split: dict) -> dict:
    """What a row's PDFs depend on: the hash of the code its stages import from this
    repository (:func:`code_files`), the external package's version (FlexZBoost, BPZ), the
    resolved inform/estimate configuration, data set, split and seed; for a spec of
    :func:`seed_shifted`, its ``member_seed_offset`` too (absent for offset 0, so that earlier
    records stay reusable: the offset also changes the configuration hash)."""
    from importlib.metadata import PackageNotFoundError, version

    mods = [path.split(":")[0] for path in (spec.informer, spec.estimator)]
    try:
        pkg = f"{spec.package}=={version(spec.package)}" if spec.package else ""
    except PackageNotFoundError:
        pkg = f"{spec.package} (not installed)"
    inform, estimate = spec.make_configs(ds, quick)
    cfg = json.dumps({"inform": inform, "estimate": estimate}, sort_keys=True, default=repr)
    return {"key": spec.key, "stages": f"{spec.informer} / {spec.estimator}",
            "code_sha256": code_hash(code_files(mods)), "package": pkg,
            "config_sha256": hashlib.sha256(cfg.encode()).hexdigest(), "quick": bool(quick), **split,
            **({"member_seed_offset": spec.member_seed_offset} if getattr(spec, "member_seed_offset", 0) else {})}


def reusable(prov_path: Path, files: tuple, fingerprint: dict) -> tuple[dict | None, str]:
    """(recorded provenance, '') when ``files`` exist and ``prov_path`` matches ``fingerprint``;
    (None, reason) otherwise."""
    missing = [str(f) for f in (prov_path, *files) if not Path(f).exists()]
    if missing:
        return None, "missing " + ", ".join(missing)
    rec = json.loads(Path(prov_path).read_text())
    diff = [k for k, v in fingerprint.items() if rec.get("fingerprint", {}).get(k) != v]
    if diff:
        return None, "recorded provenance differs in " + ", ".join(diff)
    return rec, ""


def load_dataset(data: str, quick: bool = False):
    """The benchmark's data set, unsplit: ``ds.train`` all training rows, ``ds.test`` the test
    file (what the refitted members of ``--refit`` are trained on and estimate)."""
    from rail.deepz import datasets

    if data == "dc2":
        return datasets.load_dc2(n_train=2000 if quick else None, n_test=2000 if quick else None)
    return datasets.load_boss(n_max=6000 if quick else None)


def split_dataset(data: str, quick: bool = False):
    """The benchmark's split: ``(ds, val, test, fit_idx, n_val, n_test)`` with ``ds.train`` the
    80% the estimators are trained on and ``ds.test`` the 20% stack-validation rows followed by
    the test file's rows (what each estimator estimates in one call); seed 0."""
    ds = load_dataset(data, quick)
    n_tr = len(ds.train[ds.redshift_col])
    perm = np.random.default_rng(0).permutation(n_tr)
    n_val = int(round(0.2 * n_tr))
    val_idx, fit_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    full_train, test = ds.train, ds.test
    val = {k: np.asarray(v)[val_idx] for k, v in full_train.items()}
    ds.train = {k: np.asarray(v)[fit_idx] for k, v in full_train.items()}
    ds.test = {k: np.concatenate([val[k], np.asarray(test[k])]) for k in test}
    return ds, val, test, fit_idx, n_val, len(test[ds.redshift_col])


def split_file(path: Path, n_first: int, out_a: Path, out_b: Path) -> None:
    import qp

    n = qp.data_length(str(path))
    qp.read(str(path), read_slice=slice(0, n_first)).write_to(str(out_a))
    qp.read(str(path), read_slice=slice(n_first, n)).write_to(str(out_b))


def obtain_row(row: str, spec, ds, a, out: Path, work: Path, files: tuple, fp: dict, place, timings: dict,
               provenance: dict) -> None:
    """Row ``row``'s qp ``files`` in ``out``: with ``--reuse`` taken from an earlier run when
    ``<out>/<row>_provenance.json`` matches ``fp`` (:func:`reusable`); otherwise ``spec`` is
    trained on ``ds.train`` and estimates ``ds.test`` in ``work`` (model and qp file named by
    the registry key), ``place(qp file)`` writes ``files`` and the record is written. Fills
    ``timings[row]`` and ``provenance[row]``."""
    from rail.evaluation.deepz_compare import run_estimator

    prov_path = out / f"{row}_provenance.json"
    if a.reuse:
        rec, why = reusable(prov_path, files, fp)
        if rec is not None:
            timings[row] = rec["timings"]
            provenance[row] = {"reused": True, "trained_at_commit": rec["git_commit"], "trained": rec["date"],
                               "load_note": rec.get("load_note", ""), "verification": rec.get("verification", "")}
            print(f"[stack] {row}: reusing {', '.join(map(str, files))} (trained at {rec['git_commit']}, "
                  f"{rec['date']}; same code, configuration and split)", flush=True)
            return
        print(f"[stack] {row}: retraining ({why})", flush=True)
    prov_path.unlink(missing_ok=True)  # no record for files being rewritten
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    work.mkdir(parents=True, exist_ok=True)
    path, t = run_estimator(spec, ds, work, quick=a.quick, log=lambda m: print(m, flush=True))
    place(Path(path))
    timings[row] = t
    rec = {"fingerprint": fp, "git_commit": git_commit(), "date": started, "timings": t,
           "load_note": a.load_note, "torch_threads": machine_info()["torch_threads"]}
    prov_path.write_text(json.dumps(rec, indent=2, default=float))
    provenance[row] = {"reused": False, "trained_at_commit": rec["git_commit"], "trained": started,
                       "load_note": a.load_note}


def train_refit_rows(a, keys, out: Path, timings: dict, provenance: dict, n_test: int) -> dict:
    """``--refit``: each of ``keys`` trained (same registry configuration and seeds) on all rows
    of the training file, estimating the test file only: ``<out>/<key>_refit_test.hdf5`` with
    ``<out>/<key>_refit_provenance.json`` (model in ``<out>/refit/``). Returns {key: qp file}."""
    from rail.evaluation import deepz_registry as reg

    ds = load_dataset(a.data, a.quick)
    n_full = len(ds.train[ds.redshift_col])
    if len(ds.test[ds.redshift_col]) != n_test:
        raise RuntimeError(f"--refit: test file has {len(ds.test[ds.redshift_col])} rows, the split's {n_test}")
    split = {"data": a.data, "refit": True, "n_fit": int(n_full), "n_test": n_test}
    print(f"[stack] refit: {', '.join(keys)} on all {n_full} training rows", flush=True)
    files = {}
    for key in keys:
        files[key] = out / f"{key}_refit_test.hdf5"
        spec = seed_shifted(reg.get(key), a.member_seed_offset)
        obtain_row(f"{key}_refit", spec, ds, a, out, out / "refit", (files[key],),
                   row_fingerprint(spec, ds, a.quick, split), lambda path, f=files[key]: path.replace(f),
                   timings, provenance)
    return files


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reuse", action="store_true", help="reuse an earlier run's qp files (and times) in --out for "
                   "each row whose recorded provenance matches the current code, configuration and split; retrain "
                   "the others")
    p.add_argument("--estimators", default=",".join(ESTIMATORS), help="estimators trained on the 80%% "
                   "('none': no such row, e.g. a process that trains only --refit rows)")
    p.add_argument("--stack-inputs", default="", help="the estimators the stacks combine (default: all of "
                   "--estimators)")
    p.add_argument("--variants", default="", help="stack variants to fit (default: all; 'none': no stack, "
                   "only the estimators); the equal average needs linear_pool")
    p.add_argument("--refit", action="store_true", help="also train the stacked estimators on all training "
                   "rows (rows <key>_refit) and apply the stacks fitted on the 80%% members to their test PDFs "
                   "(rows <label>_refit)")
    p.add_argument("--refit-keys", default="", help="--refit: the estimators to refit (default: the stack "
                   "inputs; applying the stacks needs all of them)")
    p.add_argument("--member-seed-offset", type=int, default=0, help="add this to the stage seed of every "
                   "trained deep row (singles, ensembles, refits; member m keeps seed + m); the split (seed 0), "
                   "FlexZBoost and BPZ unchanged; nonzero: the stem gets _seed<K> (default 0: the registry's "
                   "seeds)")
    p.add_argument("--stem", default="stack_dc2", help="name of the results files")
    p.add_argument("--out", default=None, help="folder for qp files (default out/<stem>)")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--data", default="dc2", choices=("dc2", "boss"),
                   help="dc2 (pz-rail-base files) or boss (../shared/data/sdss_boss_dr10, its seeded 70/30 split)")
    p.add_argument("--load-note", default="machine shared by several engineers (2 cores, heavily loaded): times "
                   "are under load", help="what else ran on the machine (recorded with the times)")
    a = p.parse_args(argv)
    if a.member_seed_offset < 0:
        p.error("--member-seed-offset must be >= 0")
    if a.member_seed_offset and not a.stem.endswith(f"_seed{a.member_seed_offset}"):
        a.stem += f"_seed{a.member_seed_offset}"  # its own results files (and default --out)
    a.out = a.out or str(HERE / "out" / a.stem)
    keys = [k.strip() for k in a.estimators.split(",") if k.strip() and a.estimators != "none"]
    stacked = [k.strip() for k in a.stack_inputs.split(",") if k.strip()] or keys
    refit_keys = ([k.strip() for k in a.refit_keys.split(",") if k.strip()] or stacked) if a.refit else []
    if a.variants != "none" and set(stacked) - set(keys):
        p.error(f"--stack-inputs {sorted(set(stacked) - set(keys))} not in --estimators (or --variants none)")
    if refit_keys and a.variants != "none" and set(stacked) - set(refit_keys):
        p.error(f"--refit: the stacks combine {stacked}; refit all of them (--refit-keys), or --variants none")

    from rail.core.data import TableHandle

    from rail.estimation.algos import deepz_stack as dst
    from rail.evaluation import deepz_registry as reg
    from rail.evaluation.deepz_compare import compare, format_table, overall_table

    out = Path(a.out + ("_quick" if a.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    ds, val, test, fit_idx, n_val, n_test = split_dataset(a.data, a.quick)
    name = {"dc2": "DC2", "boss": "SDSS BOSS"}[a.data]
    print(f"[stack] {name}: train {len(fit_idx)}, stack validation {n_val}, test {n_test}", flush=True)

    val_files, test_files, timings, provenance = {}, {}, {}, {}
    split = {"data": a.data, "split_seed": 0, "n_fit": int(len(fit_idx)), "n_stack_validation": n_val,
             "n_test": n_test}
    for key in keys:
        val_files[key], test_files[key] = out / f"{key}_val.hdf5", out / f"{key}_test.hdf5"
        spec = seed_shifted(reg.get(key), a.member_seed_offset)
        files = (val_files[key], test_files[key])
        obtain_row(key, spec, ds, a, out, out, files, row_fingerprint(spec, ds, a.quick, split),
                   lambda path, f=files: split_file(path, n_val, *f), timings, provenance)
    refit_files = train_refit_rows(a, refit_keys, out, timings, provenance, n_test) if refit_keys else {}
    vtab = {"redshift": val[ds.redshift_col], ds.ref_band: val[ds.ref_band]}
    id_col = ds.extra.get("id_col")  # the estimates carry the input's ids: score them by id
    ttab = {"redshift": np.asarray(test[ds.redshift_col]), ds.ref_band: np.asarray(test[ds.ref_band]),
            (id_col or "id"): np.asarray(test[id_col]) if id_col else np.arange(n_test)}
    import h5py

    ttab_path = out / "test_table.hdf5"  # on disk, so that the stack estimator streams it in chunks
    for path, tab in ((ttab_path, ttab), (out / "val_table.hdf5", vtab)):  # (the latter for later checks)
        with h5py.File(path, "w") as f:
            for k, v in tab.items():
                f.create_dataset(k, data=v)
    vin = {k: str(val_files[k]) for k in stacked if k in val_files}  # (all of them when a stack is fitted)
    tin = {k: str(test_files[k]) for k in stacked if k in test_files}

    # the held-out check (a second fit) only for the main variant
    variants = {
        "linear_pool": dict(recalibrate=False, holdout_fraction=0.0),
        "stack_crps": dict(holdout_fraction=0.25),
        "stack_crps_magbin": dict(bin_col=ds.ref_band, n_bins=4, min_bin_objects=300, holdout_fraction=0.0),
        "stack_logscore": dict(score="logscore", holdout_fraction=0.0),
        "stack_logscore_magbin": dict(score="logscore", bin_col=ds.ref_band, n_bins=4, min_bin_objects=300,
                                      holdout_fraction=0.0),
    }
    if a.variants:
        variants = {} if a.variants == "none" else {k: variants[k] for k in a.variants.split(",")}
    models, stack_files = {}, {}
    for label, kw in variants.items():
        inf = dst.DeepzStackInformer.make_stage(name=f"stack_inf_{label}", model=str(out / f"{label}.pkl"),
                                                inputs=vin, hdf5_groupname="", **kw)
        t0 = time.perf_counter()
        inf.inform(TableHandle("input", data=vtab))
        t_inf = time.perf_counter() - t0
        est = dst.DeepzStackEstimator.make_stage(name=f"stack_est_{label}", model=inf.get_handle("model"),
                                                 inputs=tin, hdf5_groupname="", output=str(out / f"{label}.hdf5"))
        t0 = time.perf_counter()
        est.estimate(TableHandle("input", path=str(ttab_path)))
        t_est = time.perf_counter() - t0
        models[label], stack_files[label] = inf.model, out / f"{label}.hdf5"
        timings[label] = {"inform_time_s": t_inf, "estimate_time_s": t_est, "n_train": n_val, "n_test": n_test}
        print(f"[stack] {label}: weights {np.round(inf.model['weights'], 3).tolist()}, "
              f"a {np.round(inf.model['a'], 3).tolist()}, b {np.round(inf.model['b'], 3).tolist()}; "
              f"inform {t_inf:.1f} s, estimate {t_est:.1f} s (under load)", flush=True)

    if "linear_pool" in models:  # equal-weight average on the same grid: equal weights, no transform
        eq = dict(models["linear_pool"])
        eq["weights"] = np.full_like(eq["weights"], 1.0 / len(stacked))
        est = dst.DeepzStackEstimator.make_stage(name="stack_est_equal", model=eq, inputs=tin, hdf5_groupname="",
                                                 output=str(out / "equal_average.hdf5"))
        est.estimate(TableHandle("input", path=str(ttab_path)))
        stack_files["equal_average"] = out / "equal_average.hdf5"

    refit_stacks = {}
    if refit_keys and models:  # the stacks fitted on the 80% members, unchanged, on the refitted members' PDFs
        rin = {k: str(refit_files[k]) for k in stacked}
        for label in [*models, *(["equal_average"] if "equal_average" in stack_files else [])]:
            model = eq if label == "equal_average" else str(out / f"{label}.pkl")  # the file its informer wrote
            est = dst.DeepzStackEstimator.make_stage(name=f"stack_est_{label}_refit", model=model, inputs=rin,
                                                     hdf5_groupname="", output=str(out / f"{label}_refit.hdf5"))
            t0 = time.perf_counter()
            est.estimate(TableHandle("input", path=str(ttab_path)))
            t_est = time.perf_counter() - t0
            stack_files[f"{label}_refit"] = out / f"{label}_refit.hdf5"
            refit_stacks[f"{label}_refit"] = {
                "stack": label, "inputs": rin,
                "model_sha256": None if label == "equal_average" else file_sha256(out / f"{label}.pkl")}
            timings[f"{label}_refit"] = {"inform_time_s": 0.0, "estimate_time_s": t_est, "n_train": n_val,
                                         "n_test": n_test, "note": f"{label}'s fit, not refitted"}
            print(f"[stack] {label}_refit: {label} (fitted on the 80% members) on the refitted members' "
                  f"test PDFs; estimate {t_est:.1f} s", flush=True)

    order = ("equal_average", "linear_pool", "stack_crps", "stack_crps_magbin", "stack_logscore",
             "stack_logscore_magbin")
    estimates = {**{k: str(v) for k, v in test_files.items()},
                 **{k: str(stack_files[k]) for k in order if k in stack_files},
                 **{f"{k}_refit": str(v) for k, v in refit_files.items()},
                 **{f"{k}_refit": str(stack_files[f"{k}_refit"]) for k in order if f"{k}_refit" in stack_files}}
    res = compare(estimates=estimates, truth=ttab, redshift_col="redshift", mag_col=ds.ref_band, id_col=id_col,
                  zmin=ds.zmin,
                  zmax=ds.zmax, outdir=out / "compare", plots=False, print_table=False, progress=False)
    wide = overall_table(res.table, REPORT)
    metrics = {e: {k: (None if v != v else float(v)) for k, v in row.items()} for e, row in wide.iterrows()}

    def plain(model):
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in model.items()}

    report = {
        "benchmark": "stack", "date": when, "git_commit": git_commit(), "machine": machine_info(),
        "load_note": a.load_note,
        "data": a.data, "quick": a.quick, "n_fit_estimators": int(len(fit_idx)), "n_stack_validation": n_val,
        "n_test": n_test, "estimators": keys, "stack_inputs": stacked, "point_estimate": "zmode", "metrics": metrics,
        "member_seed_offset": a.member_seed_offset,
        "argv": list(sys.argv if argv is None else argv), "provenance": provenance,
        "timings_s_under_load": timings, "models": {k: plain(m) for k, m in models.items()},
        "refit": {"estimators": refit_keys, "n_fit": (int(timings[f"{refit_keys[0]}_refit"]["n_train"])
                                                      if refit_keys else None),
                  "stacks": refit_stacks},
    }
    res_dir = Path(a.results)
    res_dir.mkdir(parents=True, exist_ok=True)
    stem = a.stem + ("_quick" if a.quick else "")
    (res_dir / f"{stem}.json").write_text(json.dumps(report, indent=2, default=float))
    lines = [
        f"# {'Stacking' if a.stem == 'stack_dc2' else 'Ensembles and stacking'} benchmark: {name}", "",
        f"{when}, commit {report['git_commit']}; {report['machine']['platform']}, "
        f"{report['machine']['cpu_count']} CPUs; load: {a.load_note}.",
        f"Estimators trained on {len(fit_idx)} rows of the {name} training file; stack fitted on the other "
        f"{n_val}; all rows scored on the {n_test}-row test file; point estimate zmode"
        f"{'; QUICK settings (not representative)' if a.quick else ''}.",
        *([f"Member seeds shifted by {a.member_seed_offset} (`--member-seed-offset`): every deep row's stage seed "
           f"is the registry's + {a.member_seed_offset} (member m: + m); split, FlexZBoost and BPZ unchanged."]
          if a.member_seed_offset else []),
        *([f"Rows `<key>_refit`: {', '.join(refit_keys)} trained again (same configuration and seeds) on all "
           f"{report['refit']['n_fit']} training rows; rows `<stack>_refit`: each stack fitted above (on the 80% "
           f"members' PDFs of the {n_val} stack-validation rows) applied unchanged to the refitted members' test "
           f"PDFs."] if refit_keys else []), "",
        format_table(res.table, "markdown", REPORT), "",
        "Times (wall-clock seconds under load; estimate = the stack-validation and test rows in one call"
        f"{'; for the *_refit rows the test rows only' if refit_keys else ''}):", "",
        "| estimator | inform_time_s | estimate_time_s |", "|---|---|---|",
        *[f"| {k} | {t['inform_time_s']:.1f} | {t['estimate_time_s']:.1f}{' (' + t['note'] + ')' if t.get('note') else ''} |"
          for k, t in timings.items()], "",
        "Fitted stacks (weights in the order " + ", ".join(stacked) + "; last row = global):", "",
    ]
    for label, m in models.items():
        d = m.get("diagnostics", {})
        lines.append(f"* {label}: weights {np.round(m['weights'], 3).tolist()}, a {np.round(m['a'], 3).tolist()}, "
                     f"b {np.round(m['b'], 3).tolist()}; inform {timings[label]['inform_time_s']:.0f} s, estimate "
                     f"{timings[label]['estimate_time_s']:.0f} s (under load)")
        if "stack" in d:
            lines.append(f"  held-out check on {d['holdout']['n_holdout']} validation rows (fit on "
                         f"{d['holdout']['n_fit']}): CRPS stack {d['stack']['crps']:.4f} vs equal "
                         f"{d['equal_weights']['crps']:.4f}; PIT KS stack {d['stack']['pit_ks']:.3f} vs equal "
                         f"{d['equal_weights']['pit_ks']:.3f}")
    lines += ["", "Provenance of each row's PDFs (`<out>/<key>_provenance.json`; reused rows passed the code, "
              "configuration and split check of `--reuse`):", "",
              "| estimator | trained at commit | started (UTC) | reused |", "|---|---|---|---|",
              *[f"| {k} | {p['trained_at_commit'][:12] if p['trained_at_commit'][0].isalnum() and ' ' not in p['trained_at_commit'] else p['trained_at_commit']}"
                f"{'+dirty' if p['trained_at_commit'].endswith('+dirty') else ''}"
                f" | {p['trained']} | {'yes' if p['reused'] else 'no'}"
                f"{'; ' + p['verification'] if p.get('verification') else ''} |" for k, p in provenance.items()]]
    (res_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(format_table(res.table, "text", REPORT))
    print(f"[stack] wrote {res_dir / (stem + '.json')} and .md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
